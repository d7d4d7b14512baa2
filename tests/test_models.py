"""Safe model loading: named architectures, safetensors, weights_only, hash pinning, contracts."""

from __future__ import annotations

import pickle

import pytest
import torch
from safetensors.torch import save_file

from icam_med.audit.hashing import sha256_file
from icam_med.config import ModelConfig, parse_config
from icam_med.models import build_architecture, check_input_contract, load_model

MONAI_ARGS = {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "channels": [4, 8],
              "strides": [2], "num_res_units": 0}


def _cfg(weights=None, sha=None, **kw):
    base = {"name": "unet", "architecture": "UNet", "args": MONAI_ARGS, "weights": weights,
            "weights_sha256": sha, "in_channels": 1, "spatial_size": (8, 8, 8)}
    base.update(kw)
    return ModelConfig(**base)


@pytest.fixture
def trained(tmp_path):
    torch.manual_seed(1)
    net = build_architecture("UNet", MONAI_ARGS)
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    path = tmp_path / "w.safetensors"
    save_file(state, str(path))
    return net, path


def test_safetensors_round_trip_with_hash(trained):
    net, path = trained
    model, info = load_model(_cfg(path, sha256_file(path)))
    assert not model.training
    x = torch.randn(1, 1, 8, 8, 8)
    net.eval()
    torch.testing.assert_close(model(x), net(x))
    assert info.weights_sha256 == sha256_file(path) and info.weights_format == "safetensors"
    assert info.weights_file == "w.safetensors"


def test_hash_mismatch_is_refused_before_parsing(trained, tmp_path):
    _, path = trained
    with pytest.raises(ValueError, match="refusing to load weights that are not the audited"):
        load_model(_cfg(path, "0" * 64))
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    # The hash is checked first: an unaudited file is never handed to a parser.
    with pytest.raises(ValueError, match="refusing to load weights that are not the audited"):
        load_model(_cfg(garbage, "0" * 64))


def test_config_hash_is_checked_from_yaml(trained, tmp_path):
    _, path = trained
    data = {"model": {"name": "m", "architecture": "UNet", "args": MONAI_ARGS,
                      "weights": path.name, "weights_sha256": "ab" * 32}}
    cfg = parse_config(data, base_dir=tmp_path)
    assert cfg.model.weights == path
    with pytest.raises(ValueError, match="SHA-256"):
        load_model(cfg.model)


def test_pt_state_dict_loads_with_weights_only(trained, tmp_path):
    net, _ = trained
    pt = tmp_path / "w.pt"
    torch.save({"state_dict": net.state_dict()}, pt)
    model, info = load_model(_cfg(pt))
    assert info.weights_format == "torch-state-dict"
    for k, v in net.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v)


class _Payload:
    """Unpickling this would create a file: proof that no full unpickling happens."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickle_payload_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as fh:
        pickle.dump({"weight": _Payload(marker)}, fh)
    with pytest.raises(ValueError, match="weights_only=True"):
        load_model(_cfg(evil))
    assert not marker.exists()


def test_unknown_suffix_and_missing_file(tmp_path):
    odd = tmp_path / "w.ckpt"
    odd.write_bytes(b"x")
    with pytest.raises(ValueError, match=r"expected \.safetensors"):
        load_model(_cfg(odd))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(_cfg(tmp_path / "nope.safetensors"))


def test_weights_that_do_not_fit(trained):
    _, path = trained
    with pytest.raises(ValueError, match="does not fit architecture"):
        load_model(_cfg(path, args={**MONAI_ARGS, "channels": [4, 16]}))


def test_architectures_by_name_and_import_path():
    with pytest.raises(ValueError, match=r"did you mean \['DenseNet121'"):
        build_architecture("DenseNet12")
    net = build_architecture("icam_med.networks:LesionNet",
                             {"spatial_dims": 2, "in_channels": 1, "out_channels": 2,
                              "channels": [4, 8]})
    assert net(torch.zeros(1, 1, 16, 16)).shape == (1, 2)
    # Outside the allow-list: refused from the string, before any import.
    with pytest.raises(ValueError, match="not an allowed source of networks"):
        build_architecture("no_such_pkg.mod:Net")
    with pytest.raises(ValueError, match="not an allowed source of networks"):
        build_architecture("os.path:join")


def test_registered_architectures(monkeypatch):
    from icam_med import config

    monkeypatch.setattr(config, "_REGISTERED", set())
    config.register_architecture("no_such_pkg.mod:Net")
    with pytest.raises(ValueError, match="cannot import module"):
        build_architecture("no_such_pkg.mod:Net")
    config.register_architecture("os.path")
    with pytest.raises(ValueError, match=r"does not name a torch\.nn\.Module"):
        build_architecture("os.path:join")
    config.register_architecture("torch.nn:Conv3d")
    net = build_architecture("torch.nn:Conv3d", {"in_channels": 1, "out_channels": 2,
                                                 "kernel_size": 3})
    assert isinstance(net, torch.nn.Conv3d)
    # Registering one class does not open its module.
    with pytest.raises(ValueError, match="not an allowed source"):
        build_architecture("torch.nn:Conv2d", {"in_channels": 1, "out_channels": 2,
                                               "kernel_size": 3})
    with pytest.raises(ValueError, match=r"expected 'package\.module'"):
        config.register_architecture("not a module")


def test_input_contract(trained):
    _, path = trained
    _, info = load_model(_cfg(path))
    check_input_contract(info, (1, 8, 8, 8))
    with pytest.raises(ValueError, match=r"has 2 channel\(s\).*expects 1"):
        check_input_contract(info, (2, 8, 8, 8), source="scan.nii.gz")
    with pytest.raises(ValueError, match=r"spatial size after preprocessing is \(8, 8, 9\)"):
        check_input_contract(info, (1, 8, 8, 9))


@pytest.mark.parametrize(("wrap", "steps"), [
    (lambda sd: {"state_dict": sd, "epoch": 3}, ("key:state_dict",)),
    (lambda sd: {"model": sd, "optimizer": {"lr": torch.tensor(0.1)}}, ("key:model",)),
    (lambda sd: {"network": sd}, ("key:network",)),
    (lambda sd: {f"module.{k}": v for k, v in sd.items()}, ("prefix:module.",)),
    # Lightning: the LightningModule's attribute `model`, under `state_dict`.
    (lambda sd: {"state_dict": {f"model.{k}": v for k, v in sd.items()}, "global_step": 7},
     ("key:state_dict", "prefix:model.")),
    # DataParallel around a Lightning-style wrapper, inside {"model": {"state_dict": ...}}.
    (lambda sd: {"model": {"state_dict": {f"module.model.{k}": v for k, v in sd.items()}}},
     ("key:model", "key:state_dict", "prefix:module.", "prefix:model.")),
])
def test_checkpoint_wrappings_are_unwrapped_and_recorded(trained, tmp_path, wrap, steps):
    net, _ = trained
    pt = tmp_path / "ckpt.pth"
    torch.save(wrap(net.state_dict()), pt)
    model, info = load_model(_cfg(pt))
    assert info.weights_unwrapped == steps
    assert info.to_dict()["weights_unwrapped"] == list(steps)
    x = torch.randn(1, 1, 8, 8, 8)
    net.eval()
    torch.testing.assert_close(model(x), net(x))


def test_safetensors_with_module_prefix(trained, tmp_path):
    net, _ = trained
    path = tmp_path / "dp.safetensors"
    save_file({f"module.{k}": v.contiguous() for k, v in net.state_dict().items()}, str(path))
    model, info = load_model(_cfg(path))
    assert info.weights_unwrapped == ("prefix:module.",) and info.weights_format == "safetensors"
    for k, v in net.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v)


def test_prefix_kept_when_the_architecture_has_it():
    """A network whose own attribute is `model` keeps its keys."""
    from icam_med.models import unwrap_state_dict

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = torch.nn.Conv3d(1, 2, 3)

    w = Wrapper()
    sd, steps = unwrap_state_dict({"state_dict": w.state_dict()}, w.state_dict().keys())
    assert steps == ("key:state_dict",) and set(sd) == set(w.state_dict())


def test_checkpoint_without_a_state_dict_names_what_it_found(tmp_path):
    pt = tmp_path / "ckpt.pt"
    torch.save({"epoch": 3, "weights": {"a": torch.zeros(1)}, "lr": 0.1}, pt)
    with pytest.raises(ValueError, match=r"does not hold a state dict.*'epoch'.*'weights'"):
        load_model(_cfg(pt))


def test_torchscript_is_refused_with_the_reason_and_the_fix(trained, tmp_path):
    net, _ = trained
    scripted = torch.jit.trace(net.eval(), torch.zeros(1, 1, 8, 8, 8))
    for name in ("model.pt", "model.ts"):
        path = tmp_path / name
        torch.jit.save(scripted, str(path))
        with pytest.raises(ValueError, match=r"TorchScript archive.*hooks? the layers of the eager"
                                             r".*state_dict\(\)"):
            load_model(_cfg(path))
