"""Model sources: local folders, hub ids (through a local hub cache, offline), GGUF files, aliases."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmpress.errors import LlmpressError
from llmpress.models.loader import load_model
from tiny_models import tiny_model

HUB_ID = "llmpress-test/tiny-llama"


def _fake_hub_cache(root: Path) -> Path:
    """A Hugging Face hub cache holding HUB_ID, as huggingface_hub lays it out after a download."""
    repo = root / "models--llmpress-test--tiny-llama"
    snapshot = repo / "snapshots" / ("0" * 40)
    tiny_model("llama", seed=11).save_pretrained(snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    return root


def _run(code: str, env: dict) -> subprocess.CompletedProcess:
    full = {**os.environ, **env, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).parent)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, timeout=300)


def test_hub_id_loads_through_the_hub_code_path(tmp_path):
    cache = _fake_hub_cache(tmp_path / "hub")
    code = ("import torch; from llmpress import load_model; from tiny_models import tiny_model, random_ids\n"
            f"m = load_model('{HUB_ID}').model; m.set_attn_implementation('eager')\n"
            "ids = random_ids(); ref = tiny_model('llama', seed=11)\n"
            "with torch.no_grad(): ok = torch.equal(m(ids).logits, ref(ids).logits)\n"
            "print('same' if ok else 'different')")
    proc = _run(code, {"HF_HUB_CACHE": str(cache)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("same")


def test_hub_id_not_available_is_one_line_exit_2(tmp_path):
    proc = _run("import sys; from llmpress.cli import main; sys.exit(main(['eval', 'nobody/no-such-model']))",
                {"HF_HUB_CACHE": str(tmp_path / "empty")})
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("llmpress: error:")]
    assert len(errors) == 1 and "nobody/no-such-model" in errors[0]
    assert "Traceback" not in proc.stderr


def test_local_folder_and_not_a_model(tmp_path):
    tiny_model("gpt2").save_pretrained(tmp_path / "g")
    loaded = load_model(tmp_path / "g")
    assert loaded.model.config.model_type == "gpt2" and loaded.folder == tmp_path / "g"
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(LlmpressError, match="neither a model folder nor a .gguf file"):
        load_model(tmp_path / "file.txt")


@pytest.mark.real
def test_gguf_file_loads_like_the_alias():
    from llmpress.models.smollm2 import gguf_path

    from_gguf = load_model(gguf_path())
    alias = load_model("smollm2-135m")
    ids = torch.tensor([[1, 504, 3458, 282, 260, 1345, 30]])
    with torch.no_grad():
        assert torch.equal(from_gguf.model(ids).logits, alias.model(ids).logits)
    assert from_gguf.model.config.model_type == "llama" and alias.tokenizer is not None
    assert not hasattr(alias.model.config, "quantization_config")
