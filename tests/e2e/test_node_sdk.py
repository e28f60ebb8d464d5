"""The official OpenAI Node SDK works against the gateway by changing baseURL alone: a chat and a stream."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

NODE_DIR = Path(__file__).parent / "node"


@pytest.fixture(scope="module")
def node_sdk():
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        pytest.fail("node and npm are needed for the Node SDK test (apt-get install -y nodejs npm)")
    if not (NODE_DIR / "node_modules" / "openai").exists():
        subprocess.run([npm, "install", "--no-audit", "--no-fund", "--no-package-lock"], cwd=NODE_DIR,
                       check=True, timeout=300, capture_output=True)
    return node


def test_chat_and_stream_with_the_node_sdk(node_sdk, gateway, key):
    env = {"PATH": "/usr/bin:/bin", "BOUNDLESS_KEY": key, "BOUNDLESS_BASE_URL": gateway.base_url}
    res = subprocess.run([node_sdk, "smoke.mjs"], cwd=NODE_DIR, env=env, capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["chat"] == "tok0 tok1 tok2 tok3 tok4"
    assert out["usage"]["completion_tokens"] == 5
    assert out["streamed"] == "tok0 tok1 tok2 tok3 tok4"
    assert out["status"] == 401
