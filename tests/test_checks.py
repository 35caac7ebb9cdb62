"""Input checks (nclib._checks through the public functions): type errors first, value checks switchable."""
from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch

import nclib
from nclib.crf import dense_crf
from nclib.energies import nc_energy
from nclib.losses import (
    densecrf_loss,
    kmeans_loss,
    nel_loss,
    normalized_cut_loss,
    partial_cross_entropy,
)
from nclib.photos import photo_tensor


def inputs(size: int = 16):
    img = photo_tensor("coffee", crop=size)
    p = torch.softmax(torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0)), 1)
    scr = torch.full((1, size, size), 255, dtype=torch.long)
    scr[0, 2, :5], scr[0, 9, :5] = 0, 2
    return img, p, scr


def _numpy_calls():
    img, p, scr = inputs()
    yield "probs", lambda: normalized_cut_loss(p.numpy(), img)
    yield "images", lambda: normalized_cut_loss(p, img.numpy())
    yield "scribbles", lambda: normalized_cut_loss(p, img, scr.numpy())
    yield "probs", lambda: densecrf_loss(p.numpy(), img)
    yield "images", lambda: kmeans_loss(p, img.numpy())
    yield "probs", lambda: nel_loss(p.numpy(), scr)
    yield "logits", lambda: partial_cross_entropy(p.numpy(), scr)
    yield "probs", lambda: dense_crf(p.numpy(), img)
    yield "images", lambda: dense_crf(p, img.numpy())
    yield "roi", lambda: normalized_cut_loss(p, img, roi=(scr == 255).numpy())


@pytest.mark.parametrize("case", range(10))
def test_non_tensor_gives_type_error_naming_the_argument(case):
    name, call = list(_numpy_calls())[case]
    with pytest.raises(TypeError, match=rf"^{name} must be a torch\.Tensor.*ndarray"):
        call()


@pytest.mark.parametrize(
    "call",
    [
        lambda img, p, scr: normalized_cut_loss(p, img, scr),
        lambda img, p, scr: densecrf_loss(p, img),
        lambda img, p, scr: kmeans_loss(p, img),
        lambda img, p, scr: dense_crf(p, img),
        lambda img, p, scr: nc_energy(p, img),
    ],
)
def test_images_scaled_to_0_1_warn(call):
    img, p, scr = inputs()
    with pytest.warns(UserWarning, match=r"images have values in \[.*\]: this looks like RGB scaled to 0\.\.1"):
        call(img / 255, p, scr)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        call(img, p, scr)  # 0..255: silent


@pytest.mark.parametrize("name", ["bi_w", "pos_w"])
@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_dense_crf_weights_must_be_finite(name, value):
    img, p, _ = inputs()
    with pytest.raises(ValueError, match=f"{name} must be a finite number"):
        dense_crf(p, img, **{name: value})


def test_images_requiring_grad_give_no_warning():
    img, p, scr = inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        normalized_cut_loss(p, img.clone().requires_grad_(), scr)
        densecrf_loss(p, img.clone().requires_grad_())
        kmeans_loss(p.clone().requires_grad_(), img.clone().requires_grad_())
        dense_crf(p.clone().requires_grad_(), img.clone().requires_grad_())


class ReadCounter:
    """Counts device-to-host reads (item / tolist / bool / float / int of a tensor) while active."""

    names = ("item", "tolist", "__bool__", "__float__", "__int__")

    def __init__(self, monkeypatch):
        self.n = 0
        for name in self.names:
            orig = getattr(torch.Tensor, name)

            def wrapped(t, *a, _orig=orig, **k):
                self.n += 1
                return _orig(t, *a, **k)

            monkeypatch.setattr(torch.Tensor, name, wrapped)


def test_value_checks_read_once_per_tensor_and_switch_off(monkeypatch):
    img, p, scr = inputs()
    ref = normalized_cut_loss(p, img, scr)
    reads = ReadCounter(monkeypatch)
    normalized_cut_loss(p, img, scr)
    on = reads.n
    reads.n = 0
    with nclib.checks(False):
        assert not nclib.checks_enabled()
        off_value = normalized_cut_loss(p, img, scr)
        off = reads.n
        # value checks are off: probabilities that do not sum to 1 pass; shapes and types are still checked
        normalized_cut_loss(p * 2, img)
        with pytest.raises(ValueError, match="images"):
            normalized_cut_loss(p, img[:, :2])
        with pytest.raises(TypeError, match="probs"):
            normalized_cut_loss(p.numpy(), img)
    assert nclib.checks_enabled()
    assert on - off == 3  # one read each for probs, images, scribbles (the lattice's own reads are the rest)
    torch.testing.assert_close(off_value, ref)
    with pytest.raises(ValueError, match="probs must be probabilities"):
        normalized_cut_loss(p * 2, img)
    old = nclib.set_checks(False)
    assert old is True and not nclib.checks_enabled()
    nclib.set_checks(True)


def test_environment_switch():
    code = "import nclib; print(nclib.checks_enabled())"
    env = dict(os.environ, NCLIB_CHECKS="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
