"""nanoseek.devices: the --device check, and whether a device runs bf16 products natively (where it does not,
`nanoseek train --dtype bf16` computes in fp32: a CPU without AVX-512 or Arm BF16 emulates bf16 products,
tens of times slower than fp32)."""

import pytest
import torch
import torch.nn.functional as F

from nanoseek.devices import native_bf16, native_fp16, native_products, pick_device
from nanoseek.train import build

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _ask_onednn_again():
    """nanoseek.devices asks oneDNN once per process: forget the answers these tests patch in."""
    from nanoseek import devices

    devices._ask_onednn.cache_clear()
    yield
    devices._ask_onednn.cache_clear()


def test_pick_device():
    assert pick_device("cpu") == CPU
    assert pick_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    for bad, msg in (("gpu0", "invalid --device 'gpu0'"), ("meta", "meta holds no data")):
        with pytest.raises(ValueError, match=msg):
            pick_device(bad)


@pytest.mark.parametrize("reported", [True, False])
def test_native_bf16_on_the_cpu_is_onednns_report(monkeypatch, reported):
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: reported)
    assert native_bf16(CPU) is reported


def test_native_bf16_without_onednn_is_false(monkeypatch):
    def missing():
        raise RuntimeError("No such operator mkldnn::_is_mkldnn_bf16_supported")

    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", missing)
    assert native_bf16(CPU) is False


@pytest.mark.parametrize("native", [True, False])
def test_bf16_autocast_only_where_bf16_products_are_native(monkeypatch, native):
    monkeypatch.setattr("nanoseek.devices.native_bf16", lambda device: native)
    x, w = torch.randn(4, 16), torch.randn(8, 16)
    with build.autocast_context(CPU, "bf16")():
        y = F.linear(x, w)
    assert y.dtype == (torch.bfloat16 if native else torch.float32)
    with build.autocast_context(CPU, "fp32")():  # fp32 never autocasts
        assert F.linear(x, w).dtype == torch.float32
    note = build.precision_note("bf16", CPU)
    assert note == ("bf16 autocast (fp32 weights)" if native else
                    "fp32 (--dtype bf16 autocasts only where bf16 products are native, and this cpu has none)")
    weights_note = build.precision_note("bf16-weights", CPU)
    assert weights_note.startswith("bf16 weights, fp32 master weights")
    assert ("warning" in weights_note) is not native
    assert build.precision_note("fp32", CPU) == "fp32"


@pytest.mark.parametrize("reported", [True, False])
def test_native_fp16_on_the_cpu_is_onednns_report(monkeypatch, reported):
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_fp16_supported", lambda: reported)
    assert native_fp16(CPU) is reported
    monkeypatch.setattr("nanoseek.devices.native_bf16", lambda device: not reported)
    assert native_products(torch.float16, CPU) is reported
    assert native_products(torch.bfloat16, CPU) is not reported
    assert native_products(torch.float32, CPU) and native_products(torch.float64, CPU)
