"""``spot-attn``: selfcheck, the missing-selector message, demo and eval end to end on a tiny model."""

from __future__ import annotations

import json
import os

import pytest
import torch

pytest.importorskip("transformers")

from spot_attention import cli  # noqa: E402
from test_hf_integration import real_selectors, tiny_llama  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices: one thread avoids paying thread hand-offs on a shared, busy CPU."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


class CharacterTokenizer:
    """Bytes modulo the tiny model's vocabulary: enough to drive the commands offline."""

    eos_token_id = 0

    def __call__(self, text, add_special_tokens=False, return_tensors=None):
        ids = [byte % 97 for byte in text.encode("utf-8")]
        return {"input_ids": torch.tensor([ids]) if return_tensors == "pt" else ids}


@pytest.fixture
def tiny_setup(tmp_path, monkeypatch):
    model = tiny_llama()
    selectors = real_selectors(model, top_p={0: 0.7, 1: 0.8, 2: 0.9}, k_min=1)
    selectors.config.training = {"settings": {"train_ctx": 64}}
    selector_dir = tmp_path / "selector"
    selectors.save(str(selector_dir))
    document = tmp_path / "document.txt"
    document.write_text(open(os.path.join(os.path.dirname(os.__file__), "argparse.py")).read()[:6000])

    def load_model(path, device, dtype, log):
        return model.to(device=device, dtype=dtype), CharacterTokenizer()

    monkeypatch.setattr(cli, "load_model", load_model)
    return model, str(selector_dir), str(document)


def test_selfcheck_lists_every_op_and_reports_no_mismatch(capsys):
    assert cli.main(["selfcheck", "--device", "cpu"]) == 0
    table = capsys.readouterr().out
    for op in ("selector_score", "select_blocks", "decode_select", "sparse_decode", "sparse_prefill", "block_mass",
               "pack_kcache", "unpack_kcache", "append_kcache"):
        assert f"| {op} |" in table
    summary = table.strip().splitlines()[-1]
    assert "0 MISMATCH" in summary and "0 error" in summary


def test_selfcheck_flags_a_wrong_kernel(monkeypatch, capsys):
    from spot_attention import ops
    from spot_attention.eval import selfcheck

    real = ops.block_mass
    monkeypatch.setattr(ops, "block_mass", lambda *args, **kwargs: real(*args, **kwargs) * 1.2)
    results = selfcheck.run_selfcheck("cpu")
    statuses = {item.status for item in results if item.op == "block_mass"}
    assert statuses <= {"MISMATCH", "missing"}
    if statuses == {"MISMATCH"}:
        monkeypatch.setattr(selfcheck, "run_selfcheck", lambda device: results)
        assert cli.main(["selfcheck", "--device", "cpu"]) == 1


def test_demo_without_a_shipped_selector_says_so(tmp_path, capsys):
    assert cli.main(["demo", "--selector", str(tmp_path / "none")]) == cli.EXIT_MISSING
    message = capsys.readouterr().err
    assert "not shipped yet" in message and "spot-attn distill" in message


def test_demo_runs_dense_and_sparse(tiny_setup, capsys):
    _, selector_dir, document = tiny_setup
    assert cli.main(["demo", "--selector", selector_dir, "--documents", document, "--tokens", "300",
                     "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "dense" in out and "sparse" in out and "top-1 next-token agreement" in out
    sparse_line = next(line for line in out.splitlines() if line.startswith("sparse"))
    assert 0.0 < float(sparse_line.split()[2]) < 1.0  # blocks read


def test_eval_writes_json_markdown_and_plot(tiny_setup, tmp_path):
    _, selector_dir, document = tiny_setup
    out = tmp_path / "results" / "eval.json"
    code = cli.main(["eval", "--selector", selector_dir, "--documents", document, "--lengths", "128", "256",
                     "--docs", "1", "--top-p-sweep", "0.9", "--passkey-lengths", "--no-progress", "--device", "cpu",
                     "--out", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["train_ctx"] == 64 and result["device"].startswith("cpu")
    assert {"device", "date", "commit", "rows", "documents"} <= set(result)
    methods = {(row["method"], str(row["budget"])) for row in result["rows"]}
    assert ("spot", "calibrated") in methods and ("spot", "0.9") in methods
    assert {"oracle", "quest", "twilight", "streaming"} <= {m for m, _ in methods}
    assert {row["L"] for row in result["rows"]} == {128, 256}
    for row in result["rows"]:
        assert 0 < row["frac_read"] <= 1 and 0 <= row["recall"] <= 1 + 1e-6 and row["ppl"] > 1
    assert result["documents"][0]["name"] == document
    assert (tmp_path / "results" / "eval.md").read_text().count("| 256 |") == len(methods)
    assert (tmp_path / "results" / "eval.png").read_bytes()[:4] == b"\x89PNG"


def test_unknown_arguments_are_rejected():
    with pytest.raises(SystemExit):
        cli.main(["eval", "--bogus"])


@pytest.mark.model
@pytest.mark.slow
def test_demo_on_the_default_model_with_the_shipped_selector(capsys):
    if not os.path.isfile(os.path.join(cli.shipped_selector_dir(), "selector.json")):
        pytest.skip("the SmolLM2-135M selector is not shipped yet")
    pytest.importorskip("gguf")
    assert cli.main(["demo", "--tokens", "1024"]) == 0
    assert "perplexity change" in capsys.readouterr().out
