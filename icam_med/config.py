"""Run configuration: model, preprocessing pipeline and CAM method, from YAML.

A config file has up to eight top-level sections::

    model:            # see ModelSection (or: {bundle: PATH, bundle_config: inference.json})
      name: demo-lesion-cnn
      architecture: icam_med.networks:LesionNet   # MONAI network name or "module:Class"
      args: {spatial_dims: 3, in_channels: 1, out_channels: 2}
      weights: ../sample_data/demo_model.safetensors   # relative to this file
      weights_sha256: "..."                            # optional; refused on mismatch
      labels: [absent, present]
      input: {channels: 1, spatial_size: [64, 64, 64]}
    preprocessing:    # MONAI dictionary transforms, in order (see icam_med.io)
      - {name: Orientationd, axcodes: RAS}
    method:           # CAM method and its options (see icam_med.cam)
      name: integrative
      target_layers: stages
    geometry:         # geometry validation options (see icam_med.io.GeometryOptions)
      slice_tolerance: 0.0
    audit:            # where the site key comes from (see icam_med.audit)
      site_key_env: ICAM_MED_SITE_KEY
    target:           # what to explain (default: a classifier's predicted class)
      label: lesion   # a class or, for a segmentation network, an output channel
      region: predicted   # segmentation only: predicted | {predicted: LABEL} | {mask: FILE}
                          #   | {masks: PATTERN} (one mask per scan: masks/{scan}_seg.nii.gz)
    inference:        # how the model runs on a scan (default: one pass on the model input)
      sliding_window: {roi_size: [96, 96, 96], overlap: 0.25, mode: gaussian}
    outputs:          # how the outputs are encoded (defaults shown)
      parametric_map:     # the DICOM Parametric Map written for DICOM input
        pixel_type: float32   # float32 (exact to 2**-16) | uint16 (integer + slope 1/65535)
        compression: deflate  # deflate | none | jpeg-ls | rle (jpeg-ls, rle: uint16 only).
                              #   deflate is the smallest float file, but dcm2niix and many
                              #   PACS refuse it: for those, 'none' (any pixel type) or
                              #   pixel_type uint16 with jpeg-ls or rle (lossless).

The file is checked against typed pydantic models (:class:`ConfigSchema`): every key must be
known (``extra="forbid"``), booleans must be YAML booleans (a quoted ``"false"`` is an
error, never ``True``), and every error is one :class:`ConfigError` naming the file, the
key path (``model.input.spatial_size[1]``), the expected type and what was given. The
transform arguments under ``preprocessing`` and the method options under ``method`` stay
open mappings: MONAI and the CAM engine validate those.

Architectures are allowed only from :data:`ALLOWED_ARCHITECTURE_NAMESPACES`
(``monai.networks.nets``, ``icam_med.networks``) or names registered with
:func:`register_architecture`; this is checked from the string, before anything is imported.

Every path in a config is resolved relative to the config file's folder.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from icam_med._schema_errors import describe_error
from icam_med.io.validation import GeometrySchema as GeometrySection
from icam_med.resources import resolve_config

__all__ = [
    "ALLOWED_ARCHITECTURE_NAMESPACES",
    "ConfigError",
    "ConfigSchema",
    "ICAMConfig",
    "MethodConfig",
    "ModelConfig",
    "ParametricMapConfig",
    "RegionConfig",
    "SlidingWindowConfig",
    "TargetConfig",
    "check_architecture_allowed",
    "load_config",
    "parse_config",
    "register_architecture",
]

#: Module namespaces whose classes a config may name as ``model.architecture``.
ALLOWED_ARCHITECTURE_NAMESPACES: tuple[str, ...] = ("monai.networks.nets", "icam_med.networks")
_REGISTERED: set[str] = set()


class ConfigError(ValueError):
    """A config that is not valid; the message names the file, the key path and the fix."""


# ---------------------------------------------------------------------------------------
# Architecture allow-list (strings only: nothing is imported here)
# ---------------------------------------------------------------------------------------

def register_architecture(name: str) -> None:
    """Allow a further architecture: a ``"package.module:ClassName"`` or a whole
    ``"package.module"`` namespace (its classes and submodules).

    Call this in your own code before loading a config that names it; configs cannot
    register anything themselves.

    Raises:
        ValueError: ``name`` is not a dotted module path (optionally ``:ClassName``).
    """
    module, _, attr = name.partition(":")
    parts = module.split(".")
    if not module or not all(p.isidentifier() for p in parts) or (attr and not attr.isidentifier()):
        raise ValueError(
            f"register_architecture({name!r}): expected 'package.module' or "
            "'package.module:ClassName'."
        )
    _REGISTERED.add(name)


def _in_namespace(module: str, namespace: str) -> bool:
    return module == namespace or module.startswith(namespace + ".")


def check_architecture_allowed(architecture: str) -> tuple[str, str]:
    """Resolve an architecture string to ``(module, class name)`` if it is allowed.

    A bare name (``"DenseNet121"``) means :mod:`monai.networks.nets`. Nothing is imported.

    Raises:
        ConfigError: the module is outside the allow-list, or the string is malformed.
    """
    if ":" in architecture:
        module, _, attr = architecture.partition(":")
    else:
        module, attr = "monai.networks.nets", architecture
    if not attr.isidentifier() or not all(p.isidentifier() for p in module.split(".")):
        raise ConfigError(
            f"architecture {architecture!r}: expected a class name of monai.networks.nets "
            "(e.g. 'DenseNet121') or 'package.module:ClassName'."
        )
    allowed = (any(_in_namespace(module, ns) for ns in ALLOWED_ARCHITECTURE_NAMESPACES)
               or f"{module}:{attr}" in _REGISTERED
               or any(":" not in r and _in_namespace(module, r) for r in _REGISTERED))
    if not allowed:
        raise ConfigError(
            f"architecture {architecture!r}: module '{module}' is not an allowed source of "
            f"networks (allowed: {', '.join(ALLOWED_ARCHITECTURE_NAMESPACES)}, plus names "
            "registered with icam_med.config.register_architecture). Nothing was imported. "
            "Register your module in code before loading the config."
        )
    return module, attr


# ---------------------------------------------------------------------------------------
# The typed schema
# ---------------------------------------------------------------------------------------

_STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
_Sha256 = Annotated[str, Field(pattern=r"^[0-9a-fA-F]{64}$")]
_PositiveInt = Annotated[int, Field(ge=1)]


class InputSection(BaseModel):
    """``model.input``: the model's input contract."""

    model_config = _STRICT
    channels: _PositiveInt | None = None
    spatial_size: list[_PositiveInt] | None = Field(default=None, min_length=1, max_length=3)
    dtype: Literal["float32", "float16", "bfloat16", "float64"] = "float32"


class ModelSection(BaseModel):
    """``model``: what network to build and which weights to load: an ``architecture``
    (+ ``args``), or a MONAI ``bundle`` folder (+ ``bundle_config``), one of the two."""

    model_config = _STRICT
    # "" when left out (defaults are not validated; a given value must be a non-empty
    # string): required unless the model is a bundle, checked in parse_config.
    name: Annotated[str, Field(min_length=1)] = ""
    architecture: Annotated[str, Field(min_length=1)] = ""
    bundle: Annotated[str, Field(min_length=1)] | None = None
    bundle_config: Annotated[str, Field(min_length=1)] | None = None
    args: dict[str, Any] = Field(default_factory=dict)
    weights: Annotated[str, Field(min_length=1)] | None = None
    weights_sha256: _Sha256 | None = None
    labels: list[str] = Field(default_factory=list)
    input: InputSection = Field(default_factory=InputSection)


class TransformStep(BaseModel):
    """One ``preprocessing`` entry: a MONAI dictionary transform name and its arguments
    (the arguments are MONAI's to check)."""

    model_config = ConfigDict(extra="allow", strict=True)
    name: Annotated[str, Field(min_length=1)]


class MethodSection(BaseModel):
    """``method``: the CAM method's name; its other keys are the engine's options."""

    model_config = ConfigDict(extra="allow", strict=True)
    name: Annotated[str, Field(min_length=1)] = "integrative"


class AuditSection(BaseModel):
    """``audit``: where the site key comes from (see :func:`icam_med.audit.phi.load_site_key`);
    never the key itself. A new audit setting needs its field here (unknown keys are refused)."""

    model_config = _STRICT
    site_key_file: Annotated[str, Field(min_length=1)] | None = None
    site_key_env: Annotated[str, Field(min_length=1)] | None = None


_Label = str | int


def _check_label(value: Any, *, allow_true: bool = False) -> Any:
    """A label (non-empty string) or an index (integer >= 0); ``True`` where allowed."""
    if allow_true and value is True:
        return value
    if (isinstance(value, bool) or not isinstance(value, str | int)
            or (isinstance(value, int) and value < 0) or value == ""):
        raise ValueError("expected a label (a string) or a channel/class index (an "
                         "integer >= 0)")
    return value
_REGION_FORMS = ("'predicted', {predicted: LABEL}, {mask: FILE} or {masks: PATTERN} (one mask "
                 "per scan)")
#: The placeholders of a per-scan mask pattern (``target.region.masks``, ``--region-masks``).
MASK_PATTERN_FIELDS = ("scan", "id", "dir")
#: The names a mask in a masks folder may have (``DIR/<scan>`` + one of these).
_MASK_DIR_ENDINGS = (".nii.gz", ".nii", ".dcm", "")


class RegionSection(BaseModel):
    """``target.region``: the voxels whose summed output a segmentation target explains:
    ``predicted`` (the model's own region of the target label), ``{predicted: LABEL}`` (its
    region of another label), ``{mask: FILE}`` (one mask on the scan's grid) or
    ``{masks: PATTERN}`` (each scan's own mask: see :meth:`RegionConfig.mask_for`)."""

    model_config = _STRICT
    predicted: Literal[True] | _Label | None = None
    mask: Annotated[str, Field(min_length=1)] | None = None
    masks: Annotated[str, Field(min_length=1)] | None = None

    @field_validator("*", mode="before")
    @classmethod
    def _no_null(cls, value: Any) -> Any:
        if value is None:
            raise ValueError(f"a value is needed; the region is one of {_REGION_FORMS}")
        return value

    @field_validator("predicted", mode="before")
    @classmethod
    def _predicted_label(cls, value: Any) -> Any:
        return _check_label(value, allow_true=True)


class TargetSection(BaseModel):
    """``target``: what the explanation explains: a class of a classifier or an output
    channel of a segmentation network (``label``: its label or index), and for segmentation
    networks the ``region`` whose output is summed (default: the predicted region)."""

    model_config = _STRICT
    label: _Label
    region: RegionSection | None = None

    @field_validator("label", mode="before")
    @classmethod
    def _label_kind(cls, value: Any) -> Any:
        return _check_label(value)

    @field_validator("region", mode="before")
    @classmethod
    def _region_shorthand(cls, value: Any) -> Any:
        if value == "predicted":
            return {"predicted": True}
        if isinstance(value, str):
            raise ValueError(f"expected {_REGION_FORMS}")
        return value


_BLEND_MODES = Literal["constant", "gaussian"]
_PAD_MODES = Literal["constant", "reflect", "replicate", "circular"]


class SlidingWindowSection(BaseModel):
    """``inference.sliding_window``: the arguments of MONAI's ``sliding_window_inference``
    the model is run with (and explained with: see :mod:`icam_med.cam.sliding`)."""

    model_config = _STRICT
    roi_size: list[_PositiveInt] = Field(min_length=2, max_length=3)
    sw_batch_size: _PositiveInt = 1
    overlap: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.25
    mode: _BLEND_MODES = "constant"
    sigma_scale: Annotated[float, Field(gt=0.0)] = 0.125
    padding_mode: _PAD_MODES = "constant"
    cval: float = 0.0


class InferenceSection(BaseModel):
    """``inference``: how the model runs on a scan."""

    model_config = _STRICT
    sliding_window: SlidingWindowSection | None = None


#: ``outputs.parametric_map.pixel_type``: the writer's (:func:`icam_med.io.writers.write_parametric_map`).
PM_PIXEL_TYPES = ("float32", "uint16")
#: ``outputs.parametric_map.compression``: the writer's ``compress`` values
#: (:data:`icam_med.io.writers.PM_COMPRESSIONS`); the last two need ``uint16``.
PM_COMPRESSIONS = ("deflate", "none", "jpeg-ls", "rle")
_INTEGER_ONLY_COMPRESSIONS = ("jpeg-ls", "rle")


class ParametricMapSection(BaseModel):
    """``outputs.parametric_map``: the DICOM Parametric Map's pixel type and compression
    (the writer's defaults: float pixel data, deflated)."""

    model_config = _STRICT
    pixel_type: Literal["float32", "uint16"] = "float32"
    compression: Literal["deflate", "none", "jpeg-ls", "rle"] = "deflate"


class OutputsSection(BaseModel):
    """``outputs``: how the output files are encoded."""

    model_config = _STRICT
    parametric_map: ParametricMapSection = Field(default_factory=ParametricMapSection)


class ConfigSchema(BaseModel):
    """A whole config file."""

    model_config = _STRICT
    model: ModelSection
    preprocessing: list[TransformStep] = Field(default_factory=list)
    method: MethodSection = Field(default_factory=MethodSection)
    geometry: GeometrySection = Field(default_factory=GeometrySection)
    audit: AuditSection = Field(default_factory=AuditSection)
    target: TargetSection | None = None
    inference: InferenceSection = Field(default_factory=InferenceSection)
    outputs: OutputsSection = Field(default_factory=OutputsSection)


def _bundle_spec(m: ModelSection, schema: ConfigSchema, resolve: Any, where: str) -> Any:
    """The bundle's model and preprocessing (:func:`icam_med.bundles.read_bundle`), after
    refusing settings the bundle itself gives."""
    if m.architecture or m.args:
        raise ConfigError(
            f"{where}: 'model.bundle' and 'model.architecture'/'model.args' are both set; a "
            "bundle's network comes from its network_def: remove architecture and args."
        )
    if schema.preprocessing:
        raise ConfigError(
            f"{where}: 'model.bundle' and 'preprocessing' are both set; a bundle's "
            "preprocessing comes from its inference config: remove the 'preprocessing' "
            "section (or drop 'bundle' and name the architecture)."
        )
    from icam_med.bundles import read_bundle

    try:
        return read_bundle(resolve(m.bundle), m.bundle_config or "inference.json", where=where)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _format_errors(exc: ValidationError, where: str) -> ConfigError:
    lines = [describe_error(e, ConfigSchema) for e in exc.errors()]
    return ConfigError(f"{where}: " + "; ".join(lines) + ".")


# ---------------------------------------------------------------------------------------
# What the rest of the code uses
# ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelConfig:
    """What model to build and how to load its weights."""

    name: str
    architecture: str
    args: dict[str, Any] = field(default_factory=dict)
    weights: Path | None = None
    weights_sha256: str | None = None
    labels: tuple[str, ...] = ()
    in_channels: int = 1
    spatial_size: tuple[int, ...] | None = None
    dtype: str = "float32"
    #: For a MONAI bundle: its name, version, config, hashes and metadata (for the record).
    bundle: dict[str, Any] | None = None


@dataclass(frozen=True)
class MethodConfig:
    """CAM method name and its options, passed unchanged to :func:`icam_med.cam.make_cam`."""

    name: str = "integrative"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RegionConfig:
    """The region a segmentation target sums its output over.

    Attributes:
        kind: ``"predicted"`` (the voxels the model predicts as ``label``), ``"mask"`` (one
            mask file) or ``"masks"`` (each scan's own mask, found by ``pattern``).
        label: for ``predicted``, the label (name or channel index) whose predicted region
            is used; ``None`` means the target's own label.
        mask: for ``mask``, the mask file (on the scan's grid; non-zero = inside).
        pattern: for ``masks``, where each scan's mask is (see :meth:`mask_for`).
        base: for ``masks``, the folder a relative pattern is relative to (the config's
            folder; the working folder for ``--region-masks``).
    """

    kind: Literal["predicted", "mask", "masks"]
    label: str | int | None = None
    mask: Path | None = None
    pattern: str | None = None
    base: Path | None = None

    @classmethod
    def parse(cls, text: str | Path) -> RegionConfig:
        """The command line's form: ``predicted``, ``predicted:LABEL`` or a mask file.

        Raises:
            ValueError: empty text, or ``predicted:`` without a label.
        """
        value = str(text).strip()
        if not value:
            raise ValueError(f"region: expected {_REGION_FORMS.replace('{', '').replace('}', '')}"
                             ", got an empty value.")
        if value == "predicted":
            return cls("predicted")
        if value.startswith("predicted:"):
            label = value.split(":", 1)[1].strip()
            if not label:
                raise ValueError("region 'predicted:' names no label; give predicted:LABEL "
                                 "(a label or a channel index) or just 'predicted'.")
            return cls("predicted", int(label) if label.isdigit() else label)
        return cls("mask", mask=Path(value).expanduser())

    @classmethod
    def masks_pattern(cls, pattern: str, base: str | Path | None = None, *,
                      where: str = "--region-masks") -> RegionConfig:
        """A per-scan mask region (``target.region.masks`` or ``--region-masks``), checked.

        ``pattern`` is a path with placeholders: ``{scan}`` (the scan's name without its
        format ending: ``case01`` for ``case01.nii.gz``, the folder's name for a DICOM series
        folder), ``{id}`` (its id in the batch), ``{dir}`` (the folder the scan is in);
        ``{{`` and ``}}`` are literal braces. Without a placeholder it names a folder holding
        one mask per scan, named as the scan (``DIR/<scan>.nii.gz``, ``.nii``, ``.dcm``, or a
        DICOM file or folder ``DIR/<scan>``). A relative pattern is relative to ``base``.

        Raises:
            ValueError: an unknown or malformed placeholder, or a pattern without a
                placeholder that is not a folder (the message names ``where``).
        """
        import string

        base_dir = Path(base) if base is not None else Path.cwd()
        text = str(pattern).strip()
        try:
            parsed = [(f, spec, conv) for _, f, spec, conv in string.Formatter().parse(text)
                      if f is not None]
        except ValueError as exc:
            raise ValueError(f"{where} {text!r} is not a valid pattern ({exc}); write the "
                             "placeholders as {scan}, {id} or {dir}, literal braces as {{ }}."
                             ) from None
        fields = [f for f, _, _ in parsed]
        fancy = next((f for f, spec, conv in parsed if spec or conv), None)
        if fancy is not None:
            raise ValueError(f"{where} {text!r}: the placeholder {{{fancy}}} has a format "
                             "specification or conversion; write plain {scan}, {id} or {dir}.")
        unknown = sorted({f for f in fields if f not in MASK_PATTERN_FIELDS})
        if unknown:
            raise ValueError(
                f"{where} {text!r}: unknown placeholder {{{unknown[0]}}}; a pattern may use "
                "{scan} (the scan's name without .nii.gz/.nii/.dcm), {id} (its batch id) and "
                "{dir} (the scan's folder).")
        if not fields:
            folder = Path(text).expanduser()
            folder = folder if folder.is_absolute() else base_dir / folder
            if not folder.is_dir():
                raise ValueError(
                    f"{where} {text!r} has no placeholder, so it must be a folder of masks "
                    f"named as their scans, but {folder} is not a folder: give the folder, or "
                    "a pattern such as 'masks/{scan}_seg.nii.gz' (one file for every scan is "
                    "'mask: FILE').")
        return cls("masks", pattern=text, base=base_dir.resolve())

    def mask_for(self, scan_path: str | Path, scan_id: str | None = None) -> Path:
        """The mask file (or DICOM folder) of one scan under a ``masks`` region, whether or
        not it exists (the caller refuses a missing one, naming the scan).

        Raises:
            ValueError: this is not a ``masks`` region.
        """
        from icam_med.paths import scan_stem

        if self.kind != "masks" or self.pattern is None:
            raise ValueError(f"mask_for needs a 'masks' region, this is {self.kind!r}.")
        scan = Path(scan_path).expanduser()
        name = scan_stem(scan)
        base = self.base if self.base is not None else Path.cwd()
        values = {"scan": name, "id": scan_id or name, "dir": str(scan.absolute().parent)}
        text = self.pattern.format_map(values)
        path = Path(text).expanduser()
        path = path if path.is_absolute() else base / path
        if text == self.pattern.replace("{{", "{").replace("}}", "}"):  # a folder of masks
            candidates = [path / f"{name}{end}" for end in _MASK_DIR_ENDINGS]
            return next((c for c in candidates if c.exists()), candidates[0])
        return path

    def to_dict(self) -> dict[str, Any]:
        """JSON form (the mask as its file name only, a pattern as its file-name part: records
        and the ledger never name input paths)."""
        out: dict[str, Any] = {"kind": self.kind, "label": self.label,
               "mask": self.mask.name if self.mask is not None else None}
        if self.kind == "masks":  # its file-name part only ({scan}_seg.nii.gz): no folders
            name = Path(self.pattern or "").name
            out["pattern"] = name if "{" in name else None
        return out


@dataclass(frozen=True)
class TargetConfig:
    """``target``: the label (class or output channel, by name or index) and the region."""

    label: str | int
    region: RegionConfig | None = None


@dataclass(frozen=True)
class SlidingWindowConfig:
    """MONAI ``sliding_window_inference`` settings (see its documentation)."""

    roi_size: tuple[int, ...]
    sw_batch_size: int = 1
    overlap: float = 0.25
    mode: str = "constant"
    sigma_scale: float = 0.125
    padding_mode: str = "constant"
    cval: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"roi_size": list(self.roi_size), "sw_batch_size": self.sw_batch_size,
                "overlap": self.overlap, "mode": self.mode, "sigma_scale": self.sigma_scale,
                "padding_mode": self.padding_mode, "cval": self.cval}


@dataclass(frozen=True)
class ParametricMapConfig:
    """``outputs.parametric_map``: how the DICOM Parametric Map is encoded (see
    :func:`icam_med.io.writers.write_parametric_map`).

    Attributes:
        pixel_type: ``"float32"`` (float pixel data, quantised to multiples of 2**-16) or
            ``"uint16"`` (unsigned 16-bit pixels with a Real World Value Mapping, slope
            ``1/65535``).
        compression: ``"deflate"`` (Deflated Explicit VR Little Endian: the smallest float
            file; dcm2niix and many PACS refuse it), ``"none"`` (Explicit VR Little Endian:
            every reader), ``"jpeg-ls"`` (JPEG-LS lossless) or ``"rle"`` (RLE lossless); the
            last two for ``uint16`` only.
    """

    pixel_type: str = "float32"
    compression: str = "deflate"

    def writer_options(self) -> dict[str, str]:
        """The keyword arguments of :func:`~icam_med.io.writers.write_parametric_map`."""
        return {"pixel_type": self.pixel_type, "compress": self.compression}

    def to_dict(self) -> dict[str, str]:
        return {"pixel_type": self.pixel_type, "compression": self.compression}


@dataclass(frozen=True)
class ICAMConfig:
    """A whole run configuration.

    ``geometry`` and ``audit`` hold only the keys the file sets (already type-checked).
    """

    model: ModelConfig
    preprocessing: tuple[dict[str, Any], ...] = ()
    method: MethodConfig = field(default_factory=MethodConfig)
    geometry: dict[str, Any] = field(default_factory=dict)
    audit: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    raw: dict[str, Any] = field(default_factory=dict)
    #: What to explain (``None``: a classifier's predicted class).
    target: TargetConfig | None = None
    #: Sliding-window inference (``None``: one pass on the preprocessed scan).
    sliding_window: SlidingWindowConfig | None = None
    #: The DICOM Parametric Map's encoding (``outputs.parametric_map``).
    parametric_map: ParametricMapConfig = field(default_factory=ParametricMapConfig)


def _where(path: Path | None) -> str:
    return f"config {path}" if path else "config"


def parse_config(data: Mapping[str, Any], base_dir: Path | None = None,
                 path: Path | None = None) -> ICAMConfig:
    """Build an :class:`ICAMConfig` from an already-parsed mapping.

    Args:
        data: the parsed YAML (or an equivalent dict).
        base_dir: folder relative paths are resolved against (default: current folder).
        path: the file the mapping came from, for error messages.

    Raises:
        ConfigError (a ValueError): a key is missing, unknown or of the wrong type, or the
            architecture is not allowed; the message names the file and the key path.
    """
    where = _where(path)
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"{where}: expected a mapping with the sections model, preprocessing, method, "
            "geometry, audit, target, inference, outputs at the top level, got "
            f"{type(data).__name__}."
        )
    if any(not isinstance(k, str) for k in data):
        raise ConfigError(f"{where}: every top-level key must be a string, got {list(data)!r}.")
    if isinstance(data.get("audit"), Mapping) and "site_key" in data["audit"]:
        raise ConfigError(
            f"{where}: 'audit.site_key' holds a secret in a config file; put the key in a file "
            "('audit.site_key_file') or an environment variable ('audit.site_key_env') instead."
        )
    try:
        schema = ConfigSchema.model_validate(dict(data))
    except ValidationError as exc:
        raise _format_errors(exc, where) from None
    m = schema.model
    if m.bundle_config is not None and m.bundle is None:
        raise ConfigError(f"{where}: 'model.bundle_config' is set without 'model.bundle'; "
                          "name the bundle folder too.")
    base = Path(base_dir) if base_dir is not None else Path.cwd()

    def resolve(value: str) -> Path:
        p = Path(value).expanduser()
        return p if p.is_absolute() else (base / p).resolve()

    pre = tuple(step.model_dump() for step in schema.preprocessing)
    spec = _bundle_spec(m, schema, resolve, where) if m.bundle is not None else None
    if spec is None:
        if not m.architecture or not m.name:
            missing = "model.architecture" if not m.architecture else "model.name"
            raise ConfigError(
                f"{where}: '{missing}' is missing; a model is named by 'name' and "
                "'architecture' (+ 'args'), or given as a MONAI bundle ('bundle: PATH')."
            )
        architecture, args = m.architecture, copy.deepcopy(m.args)
    else:
        architecture, args = spec.architecture, copy.deepcopy(spec.args)
        pre = spec.preprocessing
    try:
        check_architecture_allowed(architecture)
    except ConfigError as exc:
        item = "the bundle's network_def" if spec is not None else "'model.architecture'"
        raise ConfigError(f"{where}: {item}: {exc}") from None
    weights_path = resolve(m.weights) if m.weights is not None else None
    if spec is not None and weights_path is None:
        if spec.weights is None:
            raise ConfigError(str(spec.info.get("weights_error")))
        weights_path = spec.weights
    in_channels = m.input.channels
    if in_channels is None and spec is not None:
        in_channels = spec.in_channels
    if in_channels is None:
        arg = args.get("in_channels", 1)
        in_channels = arg if isinstance(arg, int) and not isinstance(arg, bool) else 1
    spatial = tuple(m.input.spatial_size) if m.input.spatial_size else None
    if spatial is None and spec is not None:
        spatial = spec.spatial_size
    labels = tuple(m.labels) if m.labels or spec is None else spec.labels
    name = m.name or (spec.info["name"] if spec is not None else "")
    model = ModelConfig(
        name=name,
        architecture=architecture,
        args=args,
        weights=weights_path,
        weights_sha256=m.weights_sha256.lower() if m.weights_sha256 else None,
        labels=labels,
        in_channels=int(in_channels),
        spatial_size=spatial,
        dtype=m.input.dtype,
        bundle=copy.deepcopy(spec.info) if spec is not None else None,
    )
    method_opts = dict(schema.method.model_extra or {})
    method = MethodConfig(name=schema.method.name, options=copy.deepcopy(method_opts))
    geometry = schema.geometry.model_dump(exclude_unset=True)
    audit = schema.audit.model_dump(exclude_unset=True)
    target = _target(schema.target, resolve, where)
    sliding = _sliding_window(schema.inference.sliding_window, spatial, where)
    parametric_map = _parametric_map(schema.outputs.parametric_map, where)
    return ICAMConfig(
        model=model,
        preprocessing=pre,
        method=method,
        geometry=geometry,
        audit=audit,
        path=path,
        raw=copy.deepcopy(dict(data)),
        target=target,
        sliding_window=sliding,
        parametric_map=parametric_map,
    )


def _target(section: TargetSection | None, resolve: Any, where: str) -> TargetConfig | None:
    """The ``target`` section as a :class:`TargetConfig` (the mask path resolved)."""
    if section is None:
        return None
    region = None
    r = section.region
    if r is not None:
        given = [k for k in ("predicted", "mask", "masks") if getattr(r, k) is not None]
        if len(given) != 1:
            raise ConfigError(
                f"{where}: 'target.region' must give exactly one of 'predicted', 'mask' and "
                f"'masks' (got {given or 'none'}); the region is one of {_REGION_FORMS}.")
        if r.masks is not None:
            try:
                region = RegionConfig.masks_pattern(r.masks, resolve("."),
                                                    where="'target.region.masks'")
            except ValueError as exc:
                raise ConfigError(f"{where}: {exc}") from None
        elif r.mask is not None:
            region = RegionConfig("mask", mask=resolve(r.mask))
        else:
            region = RegionConfig("predicted", None if r.predicted is True else r.predicted)
    return TargetConfig(label=section.label, region=region)


def _sliding_window(section: SlidingWindowSection | None, spatial: tuple[int, ...] | None,
                    where: str) -> SlidingWindowConfig | None:
    """``inference.sliding_window`` as a :class:`SlidingWindowConfig`; the model's input size,
    when the config gives one, must be the window's."""
    if section is None:
        return None
    roi = tuple(section.roi_size)
    if spatial is not None and tuple(spatial) != roi:
        raise ConfigError(
            f"{where}: 'model.input.spatial_size' {list(spatial)} differs from "
            f"'inference.sliding_window.roi_size' {list(roi)}; with sliding-window inference the "
            "model's input is one window: give the same size (or leave spatial_size out).")
    return SlidingWindowConfig(roi_size=roi, sw_batch_size=section.sw_batch_size,
                               overlap=float(section.overlap), mode=section.mode,
                               sigma_scale=float(section.sigma_scale),
                               padding_mode=section.padding_mode, cval=float(section.cval))


def _parametric_map(section: ParametricMapSection, where: str) -> ParametricMapConfig:
    """``outputs.parametric_map`` as a :class:`ParametricMapConfig`; refuses a compression
    DICOM does not define for float pixel data."""
    if section.compression in _INTEGER_ONLY_COMPRESSIONS and section.pixel_type != "uint16":
        raise ConfigError(
            f"{where}: 'outputs.parametric_map.compression' {section.compression!r} needs "
            f"'pixel_type: uint16', got pixel_type {section.pixel_type!r}: DICOM defines no "
            "encapsulated (JPEG-LS, RLE) compression of float pixel data. With float32 use "
            "'compression: deflate' or 'none'; or set 'pixel_type: uint16' (integer pixels, "
            "values within 1/65535) to keep 'compression: "
            f"{section.compression}'.")
    return ParametricMapConfig(pixel_type=section.pixel_type, compression=section.compression)


def load_config(path: str | Path) -> ICAMConfig:
    """Read a YAML config file.

    Raises:
        FileNotFoundError: the file does not exist.
        ConfigError (a ValueError): it is not readable YAML or not a valid config; the
            message names the file and the key.
    """
    p = resolve_config(path)  # a YAML file, or a packaged config's name ("demo")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config {p} is not UTF-8 text ({exc}); expected a YAML file.") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {p} is not valid YAML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"config {p} is nested too deeply to be a config.") from None
    return parse_config(data, base_dir=p.parent.resolve(), path=p)
