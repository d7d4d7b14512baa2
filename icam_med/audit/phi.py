"""Keeping patient identifiers out of audit records.

Two tools:

* :class:`SiteKey` and :func:`hash_uid`: DICOM UIDs enter a record only as keyed hashes
  (HMAC-SHA256 with a secret site key). The same scan gives the same hash at one site, so
  records can be linked back to the archive by whoever holds the key, and by nobody else.
  Without a key, no UID enters a record at all.
* :func:`find_phi` / :func:`check_no_phi`: a deny-list check run on every record and ledger
  entry (failures included) before it is written: identifying DICOM attribute names as
  keys, raw DICOM UIDs, absolute file paths, and any value the caller knows to be
  identifying (e.g. the patient name read from the header) as a whole token anywhere in
  the text. Which header attributes identify someone comes from the de-identification
  profile that the ``deid`` package ships (:func:`identifying_keywords`), not a hand list.

The site key comes from the config (``audit.site_key_file``: a file holding the key, or
``audit.site_key_env``: the name of an environment variable) or from the environment
variable ``ICAM_MED_SITE_KEY``. Putting the key itself in a config file is refused: configs
are shared and versioned, keys are not.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "BASIC_PROFILE_SUPPLEMENT",
    "DENY_KEYS",
    "SITE_KEY_ENV",
    "SiteKey",
    "check_no_phi",
    "find_phi",
    "hash_uid",
    "identifier_pattern",
    "identifiers_from_scan",
    "identifying_keywords",
    "load_site_key",
    "screen_text",
    "scrub_paths",
]

#: Environment variable read for the site key when the config names none.
SITE_KEY_ENV = "ICAM_MED_SITE_KEY"

_MIN_KEY_BYTES = 16

#: Attributes of the PS3.15 Basic Application Level Confidentiality Profile (Table E.1-1)
#: that deid's default header recipe leaves in place (it keeps institution, station, device
#: and patient characteristics); they are identifying too.
BASIC_PROFILE_SUPPLEMENT = (
    "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName", "StationName",
    "DeviceSerialNumber", "PatientSex", "PatientAge", "PatientSize", "PatientWeight",
    "PatientBirthDate", "PatientBirthTime", "MilitaryRank", "BranchOfService",
    "EthnicGroup", "Occupation", "MedicalRecordLocator", "PatientReligiousPreference",
    "StudyDescription", "SeriesDescription", "ProtocolName", "RequestedProcedureDescription",
    "PerformedProcedureStepDescription", "ImageComments", "DerivationDescription",
)
#: Plain-English spellings of identifying attributes, refused as record keys too.
_ALIASES = ("patient_name", "patient_id", "birth_date", "date_of_birth", "patient_sex",
            "patient_age", "accession_number", "study_date", "institution",
            "referring_physician")
# Value representations whose values can identify someone when printed (never sequences
# or binary data, nor numbers and codes: a delay time of 2000 or a code "YES" would make
# every record holding 2000 or "yes" look identifying).
_TEXT_VRS = frozenset({"PN", "LO", "SH", "DA", "TM", "DT", "UI", "AS", "ST", "LT", "UT", "UC",
                       "AE"})


def _deid_header_rules() -> list[tuple[str, str]]:
    """``(match, value)`` rules of deid's default DICOM recipe: every header field it
    removes, blanks, replaces or jitters (``match`` is ``is``, ``startswith``, ``endswith``
    or ``contains``). Read from the recipe file deid ships, without running deid (which
    prints to the terminal)."""
    from importlib import resources

    text = (resources.files("deid") / "data" / "deid.dicom").read_text("utf-8")
    rules, in_header = [], False
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith("%"):
            in_header = line == "%header"
            continue
        parts = line.split()
        if not in_header or len(parts) < 2:
            continue
        if parts[0] in ("REMOVE", "BLANK", "REPLACE", "JITTER", "ADD"):
            field = parts[1]
            match, _, value = field.partition(":") if ":" in field else ("is", "", field)
            if parts[0] == "ADD" and field == "PatientIdentityRemoved":
                continue  # deid's own marker, not an identifier
            rules.append((match, value))
    return rules


@functools.cache
def identifying_keywords() -> frozenset[str]:
    """DICOM keywords whose values identify a patient, from the de-identification profile.

    Every keyword of pydicom's data dictionary that deid's default header recipe (which
    follows the PS3.15 basic profile: names, IDs, every date, time and UID, addresses...)
    removes or replaces, plus :data:`BASIC_PROFILE_SUPPLEMENT`.
    """
    from pydicom.datadict import keyword_dict

    rules = _deid_header_rules()
    tests = {"is": str.__eq__, "startswith": str.startswith, "endswith": str.endswith,
             "contains": str.__contains__}
    found = {kw for kw in keyword_dict for match, value in rules
             if match in tests and tests[match](kw, value)}
    return frozenset(found | set(BASIC_PROFILE_SUPPLEMENT))


class _DenyKeys:
    """Lower-cased identifying keywords and aliases, computed on first use."""

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key.lower() in _deny_keys()


@functools.cache
def _deny_keys() -> frozenset[str]:
    return frozenset(k.lower() for k in (*identifying_keywords(), *_ALIASES))


#: Record keys that are refused: identifying DICOM keywords (any case) and plain aliases.
DENY_KEYS = _DenyKeys()

# A DICOM UID: dotted decimal, at least four components, starting 0/1/2 (PS3.5 9.1).
_UID_RE = re.compile(r"(?<![\w.])[0-2](?:\.(?:0|[1-9]\d*)){3,}(?![\w.])")
# An absolute POSIX path, a home path or a Windows drive path, inside any text.
_ABS_PATH_RE = re.compile(r"""(?:(?<=^)|(?<=[\s'"(=\[,:]))(?:~|[A-Za-z]:[\\/]|/)[^\s'"),\]]*""")


@dataclass(frozen=True, repr=False)
class SiteKey:
    """A secret key for keyed UID hashes. ``repr`` never shows the key."""

    secret: bytes
    source: str

    @property
    def key_id(self) -> str:
        """A short public fingerprint, so a record says *which* key hashed its UIDs."""
        return hmac.new(self.secret, b"icam-med site key id", hashlib.sha256).hexdigest()[:16]

    def __repr__(self) -> str:
        return f"SiteKey(key_id={self.key_id!r}, source={self.source!r})"


def _check_key(secret: bytes, source: str) -> SiteKey:
    if len(secret) < _MIN_KEY_BYTES:
        raise ValueError(
            f"site key from {source} is {len(secret)} bytes; keyed UID hashes need at least "
            f"{_MIN_KEY_BYTES} bytes of secret (e.g. `python -c \"import secrets; "
            "print(secrets.token_hex(32))\"`)."
        )
    return SiteKey(secret, source)


def load_site_key(audit_cfg: Mapping[str, Any] | None = None,
                  environ: Mapping[str, str] | None = None,
                  base_dir: str | Path | None = None) -> SiteKey | None:
    """The site key for UID hashes, or ``None`` when none is configured.

    Args:
        audit_cfg: the config's ``audit`` section. ``site_key_file`` (a path, relative to
            ``base_dir``) or ``site_key_env`` (an environment variable name) select the key.
        environ: the environment (default ``os.environ``); ``ICAM_MED_SITE_KEY`` is read
            when the config names no key.
        base_dir: folder relative ``site_key_file`` paths are resolved against.

    Raises:
        ValueError: the config holds the key itself, names a variable that is unset, or the
            key is too short.
        FileNotFoundError: ``site_key_file`` does not exist.
    """
    cfg = dict(audit_cfg or {})
    env = os.environ if environ is None else environ
    if "site_key" in cfg:
        raise ValueError(
            "config 'audit.site_key' holds a secret in a config file; put the key in a file "
            "('audit.site_key_file') or an environment variable ('audit.site_key_env', default "
            f"{SITE_KEY_ENV}) instead."
        )
    if cfg.get("site_key_file"):
        p = Path(cfg["site_key_file"]).expanduser()
        if not p.is_absolute() and base_dir is not None:
            p = Path(base_dir) / p
        if not p.is_file():
            raise FileNotFoundError(
                f"site key file {p} (config 'audit.site_key_file') does not exist; create it "
                "with a random secret of at least 16 bytes or remove the setting."
            )
        return _check_key(p.read_bytes().strip(), "config audit.site_key_file")
    var = cfg.get("site_key_env")
    if var:
        if not env.get(var):
            raise ValueError(
                f"config 'audit.site_key_env' names environment variable {var}, which is unset "
                "or empty; export it with the site key, or remove the setting to run without "
                "UIDs in records."
            )
        return _check_key(env[var].encode("utf-8"), f"environment variable {var}")
    if env.get(SITE_KEY_ENV):
        return _check_key(env[SITE_KEY_ENV].encode("utf-8"), f"environment variable {SITE_KEY_ENV}")
    return None


def hash_uid(uid: str, key: SiteKey) -> str:
    """HMAC-SHA256 (hex) of a DICOM UID under the site key."""
    return hmac.new(key.secret, uid.strip().encode("ascii"), hashlib.sha256).hexdigest()


@functools.lru_cache(maxsize=1 << 16)
def _identifying_tag(tag: int) -> bool:
    """Whether a top-level element's keyword (as pydicom's ``DataElement.keyword`` gives
    it: the data dictionary's, ``""`` for private and unknown tags) is identifying."""
    from pydicom.datadict import dictionary_has_tag, dictionary_keyword

    return dictionary_has_tag(tag) and dictionary_keyword(tag) in identifying_keywords()


def identifiers_from_scan(info: Any) -> tuple[str, ...]:
    """The identifying values of a loaded scan, to forbid them in its record.

    Args:
        info: an :class:`icam_med.io.ScanInfo` (or anything with ``headers`` holding pydicom
            datasets and the UID attributes); NIfTI scans carry none.

    Returns:
        The text values of every attribute in :func:`identifying_keywords` present in the
        headers (top level), and the raw UIDs, deduplicated.
    """
    values: set[str] = set()
    for ds in getattr(info, "headers", ()) or ():
        try:
            # Only the identifying elements are decoded (the tags are told apart once per
            # process): decoding every element of every slice's header was most of the
            # coordinator's seal of a DICOM series.
            tags = list(ds.keys()) if hasattr(ds, "keys") else []
            elements = [ds[t] for t in tags if _identifying_tag(int(t))]
        except Exception:  # a damaged header: nothing more to collect from it
            continue
        for elem in elements:
            if elem.VR not in _TEXT_VRS:
                continue
            value = elem.value
            items = value if isinstance(value, (list, tuple)) or type(value).__name__ == \
                "MultiValue" else [value]
            values.update(str(v).strip() for v in items if v is not None and str(v).strip())
    for attr in ("study_instance_uid", "series_instance_uid", "frame_of_reference_uid"):
        if getattr(info, attr, None):
            values.add(str(getattr(info, attr)))
    values.update(str(u) for u in getattr(info, "sop_instance_uids", ()) or () if u)
    return tuple(sorted(values))


def scrub_paths(text: str, keep: Iterable[str | Path] = (), *, names: bool = True) -> str:
    """Replace absolute paths inside free text (e.g. an error message) by ``<...>/name``.

    Args:
        text: the text.
        keep: absolute folders whose paths are shortened to paths relative to them instead
            (the output folder, whose relative paths are allowed in records).
        names: keep the file name (``<...>/name``); ``False`` gives ``<path>`` alone (file
            names can name a patient too).
    """
    roots = sorted((str(Path(k)) for k in keep), key=len, reverse=True)

    def repl(m: re.Match[str]) -> str:
        s = m.group(0)
        for root in roots:
            if s == root or s.startswith(root.rstrip("/") + "/"):
                rel = s[len(root):].lstrip("/")
                return rel or "."
        name = re.split(r"[\\/]", s.rstrip("\\/"))[-1]
        if not names:
            return "<path>"
        return f"<...>/{name}" if name else "<...>"

    return _ABS_PATH_RE.sub(repl, text)


def _walk(value: Any, where: str) -> Iterable[tuple[str, str | None, Any]]:
    """Yield (location, key, value) for every key and leaf of a JSON-like value."""
    if isinstance(value, Mapping):
        for k, v in value.items():
            loc = f"{where}.{k}" if where else str(k)
            yield loc, str(k), None
            yield from _walk(v, loc)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _walk(v, f"{where}[{i}]")
    else:
        yield where, None, value


#: Fixed values of the record and ledger formats (algorithm names, document types): they
#: come from the tool, not from any input, so an identifier that happens to equal one of
#: their tokens (a patient ID "256" and "SHA-256") is not taken for a leak.
_FORMAT_CONSTANTS = frozenset({"SHA-256", "HMAC-SHA256", "Ed25519", "icam-med.audit-record",
                               "icam-med.ledger-entry/1", "icam-med.ledger-signature/1"})


def _needles(identifiers: Iterable[str]) -> list[str]:
    """Lower-cased identifiers to look for: each value, and for a DICOM person name
    (``DOE^JOHN``) also ``doe john`` and each name part; values under 3 characters are too
    common to look for."""
    needles = {str(s).strip().lower() for s in identifiers if s is not None}
    for n in list(needles):
        if "^" in n:
            parts = [p for p in n.split("^") if p]
            needles.add(" ".join(parts))
            needles.update(parts)
    return sorted((n for n in needles if len(n) >= 3), key=len, reverse=True)


def identifier_pattern(identifiers: Iterable[str]) -> re.Pattern[str] | None:
    """A regex that finds any identifier as a whole token, case-insensitively.

    A token is bounded by anything but a letter or digit, so ``000000`` never matches inside
    a hash of zeros, ``123`` never inside ``41234``, and ``Scale`` never inside
    ``ScaleIntensityRanged``; ``DOE`` still matches in ``DOE_JOHN_01`` or ``doe-scan``.
    ``None`` when there is nothing to look for.
    """
    return _alternation(_needles(identifiers))


#: A needle of digits in dot-separated groups (a UID, a patient ID of digits, a date
#: ``19800101``): matched by :class:`_IdentifierMatcher` without a regular expression.
_DOTTED_NEEDLE = re.compile(r"[0-9]+(?:\.[0-9]+)*")
_DIGIT_DOT_RUN = re.compile(r"[0-9.]+")
#: What the token boundary of :func:`identifier_pattern` excludes, with the same flags.
_TOKEN_CHAR = re.compile(r"[0-9a-z]", re.IGNORECASE)


class _IdentifierMatcher:
    """Whether a text holds an identifier as a whole token: exactly
    ``identifier_pattern(identifiers).search(text)``, built faster.

    A 300-slice series brings 300 SOP Instance UIDs, and compiling their alternation took
    13-20 ms of every seal. Needles of dot-separated digit groups are looked up in a set
    instead: such a needle can only occur inside a maximal run of digits and dots, starting
    at the run's start or after a dot and ending at the run's end or before a dot (a digit on
    either side would join the token); at the run's ends the character outside must not be a
    token character (``[0-9a-z]``, case-insensitively), as in the pattern. Every other needle
    goes into a (short) regular expression as before.
    """

    def __init__(self, needles: list[str]) -> None:
        dotted = [n for n in needles if _DOTTED_NEEDLE.fullmatch(n)]
        self.dotted = frozenset(dotted)
        self.max_parts = max((n.count(".") + 1 for n in dotted), default=0)
        self.pattern = _alternation([n for n in needles if n not in self.dotted])

    def search(self, text: str) -> bool:
        if self.pattern is not None and self.pattern.search(text):
            return True
        if not self.dotted:
            return False
        return any(self._in_run(text, m.start(), m.end())
                   for m in _DIGIT_DOT_RUN.finditer(text))

    def _in_run(self, text: str, start: int, end: int) -> bool:
        parts = text[start:end].split(".")
        left_open = start == 0 or not _TOKEN_CHAR.match(text[start - 1])
        right_open = end == len(text) or not _TOKEN_CHAR.match(text[end])
        last = len(parts) - 1
        for p in range(len(parts)):
            if (p == 0 and not left_open) or not parts[p]:
                continue
            for q in range(p, min(len(parts), p + self.max_parts)):
                if not parts[q] or (q == last and not right_open):
                    break
                if ".".join(parts[p:q + 1]) in self.dotted:
                    return True
        return False


def _alternation(needles: list[str]) -> re.Pattern[str] | None:
    if not needles:
        return None
    body = "|".join(re.escape(n) for n in needles)
    return re.compile(rf"(?<![0-9a-z])(?:{body})(?![0-9a-z])", re.IGNORECASE)


@functools.lru_cache(maxsize=8)
def _matcher(identifiers: tuple[str, ...]) -> _IdentifierMatcher | None:
    """The matcher of ``identifiers`` (a record and its ledger entry are screened against
    the same scan's identifiers: built once)."""
    needles = _needles(identifiers)
    return _IdentifierMatcher(needles) if needles else None


def screen_text(text: str, identifiers: Iterable[str], placeholder: str = "<withheld>") -> str:
    """``text`` with every identifier (a whole token, see :func:`identifier_pattern`)
    replaced by ``placeholder``."""
    pattern = identifier_pattern(identifiers)
    return text if pattern is None else pattern.sub(placeholder, text)


def find_phi(value: Any, identifiers: Iterable[str] = ()) -> list[str]:
    """Every place in a JSON-like value that looks like a patient identifier.

    Args:
        value: a record, ledger entry or any nested dict/list of JSON values.
        identifiers: values known to identify the patient (name, ID, birth date, accession
            number, institution, raw UIDs...) that must not occur anywhere as whole tokens
            (see :func:`identifier_pattern`), case-insensitively. Values shorter than 3
            characters are ignored (too common).

    Returns:
        One message per finding, naming the location (e.g. ``input.uids.StudyInstanceUID``).
    """
    matcher = _matcher(tuple(str(i) for i in identifiers if i is not None))
    found = []
    for loc, key, leaf in _walk(value, ""):
        if key is not None:
            if key in DENY_KEYS:
                found.append(f"{loc}: identifying attribute name '{key}'")
            text = key
        elif isinstance(leaf, str):
            text = leaf
            if _UID_RE.search(leaf):
                found.append(f"{loc}: looks like a raw DICOM UID")
            m = _ABS_PATH_RE.search(leaf)
            if m and m.group(0) not in ("/", "~"):
                found.append(f"{loc}: an absolute file path")
        else:
            continue
        if text in _FORMAT_CONSTANTS:
            continue  # written by the tool itself, never from an input
        if matcher is not None and matcher.search(text):
            found.append(f"{loc}: contains a known patient identifier")
    return found


def check_no_phi(value: Any, identifiers: Iterable[str] = (), what: str = "audit record") -> None:
    """Raise if :func:`find_phi` finds anything; nothing is written in that case.

    Raises:
        ValueError: naming every finding (locations only, never the identifying value).
    """
    found = find_phi(value, identifiers)
    if found:
        raise ValueError(
            f"refusing to write the {what}: it would carry patient identifiers or paths outside "
            "the output folder: " + "; ".join(found)
        )
