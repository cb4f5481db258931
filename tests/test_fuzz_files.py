"""File fuzzing: mutants of each file kind slot_cpp reads, opened in a
crash-catching child process (see fuzzing.py). SLOT_CPP_FUZZ_EXAMPLES sets
the mutants per kind (20 by default; the README has the larger command)."""

from __future__ import annotations

from pathlib import Path

import pytest
from fuzzing import CHECKED, EXAMPLES, make_mutants, run_harness
from slot_files import write_adapter, write_datastore, write_records, write_reward


@pytest.fixture(scope="module")
def originals(tmp_path_factory, tiny_model, tiny_path) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("fuzz-originals")
    return {
        "datastore": write_datastore(tiny_model, d / "store.rtd"),
        "reward": write_reward(tiny_model, d / "head.npz"),
        "records": write_records(d / "records.jsonl"),
        "model": Path(tiny_path),
        "adapter": write_adapter(tiny_model, d / "adapter.gguf"),
    }


# Where the payload starts (NaN/inf go after it) and how wide its floats are.
_LAYOUT = {"datastore": (256, 2), "reward": (64, 8), "records": (0, 4), "model": (4096, 4), "adapter": (512, 4)}


def _mutants(originals, kind, tmp_path, n=EXAMPLES, seed=None):
    start, width = _LAYOUT[kind]
    extra = {} if seed is None else {"seed": seed}
    return make_mutants(originals[kind], tmp_path / kind, n, header_bytes=1024 if kind != "records" else 200,
                        payload_start=start, float_bytes=width, **extra)


@pytest.mark.parametrize("kind", ["datastore", "reward", "records", "model", "adapter"])
def test_mutated_files_load_the_same_or_raise_and_never_crash(originals, tiny_path, tmp_path, kind):
    mutants = _mutants(originals, kind, tmp_path)
    assert len(mutants) >= EXAMPLES * 0.9
    report = run_harness(kind, originals[kind], mutants, model=tiny_path)
    print(kind, len(mutants), "mutants:", report.outcomes)
    assert not report.failures, report.describe()
    assert sum(report.outcomes.values()) == len(mutants)
    assert report.outcomes.get("refused", 0) > 0       # the mutations reach the checks
    if kind in CHECKED:
        assert set(report.outcomes) <= {"same", "refused", "prefix"}


@pytest.mark.parametrize("kind, plant", [("datastore", "no-datastore-checksum"), ("reward", "no-zip-crc"),
                                         ("records", "no-record-checksum")])
def test_harness_catches_a_disabled_checksum(originals, tiny_path, tmp_path, kind, plant):
    # Without the checksum, payload bit flips load with other content: reported, naming the file.
    mutants = _mutants(originals, kind, tmp_path, n=25, seed=7)
    report = run_harness(kind, originals[kind], mutants, model=tiny_path, plant=plant)
    silent = [f for f in report.failures if f[0] == "loaded with other content"]
    assert silent, report.outcomes
    assert all(Path(f[1]).exists() and Path(f[1]).parent == tmp_path / kind for f in silent)


def test_harness_reports_crashes_and_hangs_with_the_file(originals, tiny_path, tmp_path):
    mutants = _mutants(originals, "datastore", tmp_path, n=5, seed=3)
    crash = run_harness("datastore", originals["datastore"], mutants, plant="crash")
    crashed = [f for f in crash.failures if f[0].startswith("crash")]
    assert crashed and len(crashed) == crash.outcomes["crash"] and "refused" not in crash.outcomes
    assert {f[1] for f in crashed} <= {str(p) for p in mutants}
    # Every mutant was still tried: a crash does not end the run.
    assert sum(crash.outcomes.values()) == len(mutants)
    hang = run_harness("datastore", originals["datastore"], mutants[:2], plant="hang", per_file_timeout=1)
    assert [f[0] for f in hang.failures] == ["hang", "hang"]
    assert [f[1] for f in hang.failures] == [str(p) for p in mutants[:2]]


def test_found_vocabulary_with_a_duplicate_token_is_refused_not_aborted(originals, tiny_path, tmp_path):
    # Found by the model fuzzing: one bit turned the token 'Ġ1' into a second
    # 'Ġ2', and llama.cpp's vocabulary loader aborted (GGML_ASSERT).
    data = Path(tiny_path).read_bytes()
    token = (3).to_bytes(8, "little") + "Ġ1".encode()
    assert data.count(token) == 1
    mutant = tmp_path / "duplicate-token.gguf"
    mutant.write_bytes(data.replace(token, (3).to_bytes(8, "little") + "Ġ2".encode()))
    report = run_harness("model", Path(tiny_path), [mutant])
    assert report.outcomes == {"refused": 1} and not report.failures, report.describe()
    import slot_cpp
    with pytest.raises(slot_cpp.ModelLoadError, match="holds the token 'Ġ2' twice"):
        slot_cpp.Model(mutant, n_ctx=64)
