"""Tests for embedcache.models.weights: local weights files (safe loading, a different head,
another architecture refused) and the weights hash."""

import pytest
import torch
from safetensors.torch import save_file

from embedcache.errors import WeightsError
from embedcache.models.build import get_backbone
from embedcache.models.weights import state_dict_sha256


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_local_weights_file_loads_and_changes_identity(tmp_path, suffix):
    torch.manual_seed(3)
    state = torchvision_resnet18_state()
    path = tmp_path / f"w{suffix}"
    if suffix == ".pt":
        torch.save(state, path)
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    bb = get_backbone("resnet18", weights_path=path)
    assert bb.weights_tag == f"file:w{suffix}"
    assert bb.weights_sha256 != get_backbone("resnet18", weights="none").weights_sha256


def test_weights_file_with_a_different_head_is_accepted(tmp_path):
    state = torchvision_resnet18_state()
    state["fc.weight"] = torch.zeros(3, 512)
    state["fc.bias"] = torch.zeros(3)
    torch.save(state, tmp_path / "ft.pt")
    assert get_backbone("resnet18", weights_path=tmp_path / "ft.pt").dim == 512


def test_weights_file_for_another_architecture_is_refused(tmp_path):
    torch.save(torchvision_resnet18_state(), tmp_path / "r18.pt")
    with pytest.raises(WeightsError, match="does not fit this architecture"):
        get_backbone("resnet34", weights_path=tmp_path / "r18.pt")


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickled_objects_are_never_loaded(tmp_path):
    torch.save({"x": _Evil()}, tmp_path / "evil.pt")
    with pytest.raises(WeightsError, match="weights_only"):
        get_backbone("resnet18", weights_path=tmp_path / "evil.pt")


def torchvision_resnet18_state():
    from torchvision.models import resnet18

    return resnet18(weights=None).state_dict()


def test_state_dict_hash_sees_values_and_handles_scalars():
    a = {"w": torch.zeros(3), "n": torch.tensor(5)}
    b = {"w": torch.zeros(3), "n": torch.tensor(6)}
    assert state_dict_sha256(a) != state_dict_sha256(b)
    assert state_dict_sha256(a) == state_dict_sha256({"n": torch.tensor(5), "w": torch.zeros(3)})
