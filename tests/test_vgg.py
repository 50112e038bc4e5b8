"""VGG13 from ImageNet as the seed did: torchvision's state-dict layout loads strictly, the
sha256 prefix of the file name is checked, the weights download once (from a local server
here), and without network the error says which URL to fetch and where to put it.

These machines cannot fetch the real weights, so the ImageNet file is generated with the
official keys and shapes (written out below, independently of cifarlab's model code)."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import threading
from pathlib import Path

import pytest
import torch

from cifarlab.cli import main
from cifarlab.errors import WeightsError
from cifarlab.models import create_model, vgg

CONVS = [(3, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 512), (512, 512), (512, 512), (512, 512)]  # fmt: skip
CLASSIFIER = {0: (4096, 25088), 3: (4096, 4096), 6: (1000, 4096)}


def torchvision_keys(batch_norm: bool) -> dict[str, tuple[int, ...]]:
    """torchvision's vgg13 / vgg13_bn state-dict keys and shapes, written out from its layout:
    per convolution [Conv2d, (BatchNorm2d,) ReLU], a MaxPool2d after every second one."""
    keys, i = {}, 0
    for n, (cin, cout) in enumerate(CONVS):
        keys[f"features.{i}.weight"], keys[f"features.{i}.bias"] = (cout, cin, 3, 3), (cout,)
        i += 1
        if batch_norm:
            for k in ("weight", "bias", "running_mean", "running_var"):
                keys[f"features.{i}.{k}"] = (cout,)
            keys[f"features.{i}.num_batches_tracked"] = ()
            i += 1
        i += 1 + (n % 2)  # the ReLU, and after every second conv the max-pool
    for j, shape in CLASSIFIER.items():
        keys[f"classifier.{j}.weight"], keys[f"classifier.{j}.bias"] = shape, shape[:1]
    return keys


def _named_by_hash(path: Path, stem: str) -> Path:
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return path.rename(path.with_name(f"{stem}-{digest[:8]}.pth"))


@pytest.fixture(scope="module")
def imagenet_file(tmp_path_factory) -> Path:
    """A file laid out as torchvision's vgg13-19584684.pth (random values, official keys)."""
    torch.manual_seed(0)
    state = {k: torch.randn(s) if s else torch.tensor(0) for k, s in torchvision_keys(False).items()}
    path = tmp_path_factory.mktemp("weights") / "vgg13.pth"
    torch.save(state, path)
    return _named_by_hash(path, "vgg13")


@pytest.mark.parametrize("name, batch_norm", [("vgg13", False), ("vgg13_bn", True)])
def test_module_names_are_torchvisions(name, batch_norm):
    model = create_model(name, num_classes=1000)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == torchvision_keys(batch_norm)


def test_imagenet_file_loads_strictly_with_a_new_head(imagenet_file):
    model = create_model("vgg13", pretrained=True, num_classes=10, weights=str(imagenet_file))
    state = torch.load(imagenet_file, weights_only=True)
    assert torch.equal(model.features[0].weight, state["features.0.weight"])
    assert torch.equal(model.classifier[3].weight, state["classifier.3.weight"])
    assert model.classifier[6].out_features == 10
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_a_file_with_other_keys_or_a_changed_byte_is_refused(tmp_path):
    small = tmp_path / "vgg13.pth"
    torch.save({"features.0.weight": torch.zeros(64, 3, 3, 3)}, small)
    named = _named_by_hash(small, "vgg13")
    with pytest.raises(WeightsError, match="not torchvision's VGG13"):  # hash fine, keys missing
        create_model("vgg13", pretrained=True, weights=str(named))
    data = bytearray(named.read_bytes())
    data[-20] ^= 0xFF
    named.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="does not start with"):
        vgg.check_hash(named)


def _serve(folder: Path):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_download_once_from_a_local_server(tmp_path, monkeypatch):
    served = tmp_path / "served"
    served.mkdir()
    (served / "f.pth").write_bytes(b"weights" * 1000)
    name = _named_by_hash(served / "f.pth", "vgg13").name
    server = _serve(served)
    try:
        monkeypatch.setitem(vgg.URLS, "vgg13", f"http://127.0.0.1:{server.server_address[1]}/{name}")
        monkeypatch.setenv("CIFARLAB_CACHE", str(tmp_path / "cache"))
        got = vgg.fetch("vgg13", progress=False)
        assert got == tmp_path / "cache" / name and got.read_bytes() == (served / name).read_bytes()
        (served / name).unlink()  # a second call must not download again
        assert vgg.fetch("vgg13", progress=False) == got
    finally:
        server.shutdown()


def test_no_network_says_which_url_and_where(tmp_path, monkeypatch, capsys, synthetic):
    monkeypatch.setitem(vgg.URLS, "vgg13", "http://127.0.0.1:9/vgg13-19584684.pth")  # nothing listens there
    monkeypatch.setenv("CIFARLAB_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    code = main(["train", "vgg13", "--data-dir", str(synthetic[0]), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert (
        "http://127.0.0.1:9/vgg13-19584684.pth" in err
        and str(tmp_path / "cache" / "vgg13-19584684.pth") in err
    )
    assert "--weights" in err and not out.exists()


@pytest.mark.slow
def test_seed_protocol_runs_end_to_end_on_the_generated_weights(imagenet_file, synthetic, tmp_path):
    out = tmp_path / "run"
    code = main(["train", "vgg13", "--preset", "seed", "--weights", str(imagenet_file), "--max-steps", "2",
                 "--eval-freq", "2", "--batch-size", "4", "--data-dir", str(synthetic[0]), "--no-progress",
                 "--out", str(out)])  # fmt: skip
    assert code == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["train"]["optimizer"] == "adam" and cfg["train"]["learning_rate"] == 1e-4
    assert cfg["model_kwargs"]["pretrained"] is True
    assert 0 <= json.loads((out / "summary.json").read_text())["test_accuracy"] <= 1
    assert main(["eval", str(out), "--data-dir", str(synthetic[0])]) == 0  # rebuilt without the ImageNet file
