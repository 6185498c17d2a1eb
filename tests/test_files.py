"""fvdm_jax/runtime/files.py: a reader never sees a half-written file."""

import json
import os

import numpy as np
import pytest

from fvdm_jax.runtime import files


def test_atomic_path_renames_only_a_finished_write(tmp_path):
    target = tmp_path / "out.json"
    with files.atomic_path(str(target)) as temporary:
        assert temporary.endswith(".json") and os.path.dirname(temporary) == str(tmp_path)
        open(temporary, "w").write("{}")
        assert not target.exists()  # not before the block ends
    assert target.read_text() == "{}"

    with pytest.raises(RuntimeError, match="disk full"):
        with files.atomic_path(str(target)) as temporary:
            open(temporary, "w").write('{"half": ')
            raise RuntimeError("disk full")
    assert target.read_text() == "{}"  # the old file stays whole
    assert sorted(os.listdir(tmp_path)) == ["out.json"]  # and no temporary is left behind


def test_writers(tmp_path):
    path = files.write_json(str(tmp_path / "a" / "b.json"), {"z": 1, "a": [1, 2]})
    assert json.load(open(path)) == {"a": [1, 2], "z": 1}
    files.write_text(str(tmp_path / "t.md"), "# hi\n")
    assert (tmp_path / "t.md").read_text() == "# hi\n"
    files.savez(str(tmp_path / "x.npz"), videos=np.arange(3))
    with np.load(tmp_path / "x.npz") as data:
        np.testing.assert_array_equal(data["videos"], [0, 1, 2])
    with pytest.raises(ValueError, match=".npz"):
        files.savez(str(tmp_path / "x.bin"), videos=np.arange(3))
