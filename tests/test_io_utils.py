import os

import pytest

from keras_das import io_utils


def test_atomic_write_replaces_whole_files_and_cleans_up_on_error(tmp_path):
    path = str(tmp_path / "genotype.json")
    io_utils.atomic_write_text(path, "old")
    with pytest.raises(RuntimeError):
        with io_utils.atomic_path(path) as tmp:
            with open(tmp, "w") as f:
                f.write("half")
            raise RuntimeError("killed")
    assert open(path).read() == "old"
    assert os.listdir(tmp_path) == ["genotype.json"]


def test_stale_temporaries_of_a_killed_writer_are_removed(tmp_path):
    (tmp_path / "genotypes").mkdir()
    (tmp_path / "workers").mkdir()
    stale = [
        tmp_path / ".alphas_reduce.png.cius566z.png",
        tmp_path / "genotypes" / ".x.json.ab_cd123.json",
    ]
    kept = [
        tmp_path / ".gitignore",
        tmp_path / ".notes.txt.abcdefgh.json",  # extension differs from the name's
        tmp_path / "genotype.json",
        tmp_path / "workers" / ".summary.json.abcdefgh.json",  # another process's
    ]
    for path in stale + kept:
        path.write_text("x")
    removed = io_utils.remove_stale_temporaries(str(tmp_path), skip=("workers",))
    assert sorted(removed) == sorted(str(p) for p in stale)
    assert all(p.exists() for p in kept) and not any(p.exists() for p in stale)
