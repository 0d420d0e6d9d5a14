"""torch.hub: the entry point, weights as a path, a file:// URL (hash checked) or a name of the weights table."""
import hashlib
import importlib.util

import pytest
import torch

from networks import build_model
from utils.checkpoint import CheckpointError
from utils.weights import WEIGHTS, PublishedWeights, resolve_weights


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    """An empty torch.hub cache for the test (``$TORCH_HOME``); yields its checkpoints folder."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    assert torch.hub.get_dir() == str(tmp_path / "torch_home" / "hub")
    return tmp_path / "torch_home" / "hub" / "checkpoints"


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    """(a tiny CCNet's state dict saved as a raw checkpoint, its sha256)."""
    torch.manual_seed(3)
    state = build_model("ccnet", "tiny", num_classes=4, recurrence=1, norm="bn").state_dict()
    path = tmp_path_factory.mktemp("weights") / "tiny.pth"
    torch.save(state, path)
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def hub_load(repo_root, **kwargs):
    return torch.hub.load(str(repo_root), "ccnet", source="local", trust_repo=True, **kwargs)


def test_hub_lists_ccnet_and_builds_it(repo_root):
    # what torch.hub.list shows for a GitHub repository: hubconf's public callables
    spec = importlib.util.spec_from_file_location("hubconf", repo_root / "hubconf.py")
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)
    assert [name for name in dir(hubconf) if callable(getattr(hubconf, name)) and not name.startswith("_")] == ["ccnet"]
    model = hub_load(repo_root, backbone="tiny", num_classes=3, recurrence=1, norm="bn").eval()
    assert model.head.recurrence == 1
    assert model(torch.randn(1, 3, 33, 33))[0].shape == (1, 3, 5, 5)


def test_weights_from_a_path_and_a_file_url_with_the_hash_in_its_name(repo_root, tiny_weights, torch_home, tmp_path):
    path, sha256 = tiny_weights
    expected = torch.load(path, weights_only=True)
    model = hub_load(repo_root, backbone="tiny", num_classes=4, recurrence=1, norm="bn", weights=str(path))
    assert torch.equal(model.state_dict()["head.bottleneck.3.weight"], expected["head.bottleneck.3.weight"])

    named = tmp_path / f"tiny-{sha256[:10]}.pth"
    named.write_bytes(path.read_bytes())
    model = hub_load(repo_root, backbone="tiny", num_classes=4, recurrence=1, norm="bn", weights=named.as_uri())
    assert torch.equal(model.state_dict()["head.conva.0.weight"], expected["head.conva.0.weight"])
    assert (torch_home / named.name).is_file()  # cached

    wrong = tmp_path / "tiny-0123456789.pth"
    wrong.write_bytes(path.read_bytes())
    with pytest.raises(CheckpointError, match="does not match its SHA-256.*nothing was kept") as error:
        hub_load(repo_root, backbone="tiny", num_classes=4, weights=wrong.as_uri())
    assert "\n" not in str(error.value)
    assert sorted(p.name for p in torch_home.iterdir()) == [named.name]  # nothing of the bad download


def test_a_name_of_the_table_downloads_checks_and_sets_r_and_classes(repo_root, tiny_weights, torch_home,
                                                                      monkeypatch):
    path, sha256 = tiny_weights
    monkeypatch.setitem(WEIGHTS, "tiny-test", PublishedWeights(path.as_uri(), "tiny-test.pth", "a test entry",
                                                               recurrence=1, num_classes=4, sha256=sha256))
    model = hub_load(repo_root, backbone="tiny", norm="bn", weights="tiny-test")
    assert model.head.recurrence == 1 and model.head.bottleneck[3].out_channels == 4
    assert resolve_weights("tiny-test") == str(torch_home / "tiny-test.pth")

    monkeypatch.setitem(WEIGHTS, "tiny-bad", PublishedWeights(path.as_uri(), "tiny-bad.pth", "wrong hash",
                                                              sha256="f" * 64))
    with pytest.raises(CheckpointError, match="--restore-from tiny-bad: the download does not match"):
        resolve_weights("tiny-bad")
    assert not (torch_home / "tiny-bad.pth").exists()


def test_paths_and_unknown_names_pass_through_and_web_pages_are_refused(tmp_path, torch_home):
    assert resolve_weights("") == ""
    assert resolve_weights("snapshots/missing.pth") == "snapshots/missing.pth"  # the loader says "no such file"
    page = tmp_path / "page.pth"
    page.write_text("<html>sign in</html>")
    with pytest.raises(CheckpointError, match="web page"):
        resolve_weights(page.as_uri())
    assert not (torch_home / "page.pth").exists()


def test_every_table_entry_is_complete():
    for name, entry in WEIGHTS.items():
        assert entry.url.startswith("http") and entry.file_name.endswith(".pth"), name
        assert (entry.recurrence is None) == (entry.num_classes is None) == (entry.val_miou is None), name
    assert len({entry.file_name for entry in WEIGHTS.values()}) == len(WEIGHTS)


def test_train_restores_from_a_file_url(training_demo, tmp_path, torch_home, capsys):
    import train  # the script: composed here, imported by no package

    torch.manual_seed(5)
    weights = tmp_path / "initial.pth"
    torch.save(build_model("ccnet", "tiny", num_classes=19, recurrence=2, norm="bn").state_dict(), weights)
    argv = training_demo.training_argv(tmp_path / "run", steps=1)
    argv[argv.index("--restore-from") + 1] = weights.as_uri()
    assert train.main(argv) == 0
    output = capsys.readouterr()
    assert f"weights from {torch_home / 'initial.pth'}" in output.out + output.err
