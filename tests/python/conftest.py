import os
import subprocess
import sys

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
BIN = os.path.join(ROOT, os.environ.get("BUILD_DIR", "build"), "bin")
sys.path.insert(0, os.path.dirname(__file__))


def run_bin(name, *args, check=True, threads=2):
    cmd = [os.path.join(BIN, name), *map(str, args)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr}")
    return r


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory):
    from sdtest.tiny_models import make_pipeline

    d = tmp_path_factory.mktemp("tiny_sd")
    pipe = make_pipeline(str(d))
    return str(d), pipe


@pytest.fixture(scope="session")
def clip_tokenizer_dir(tmp_path_factory):
    from sdtest.tiny_models import write_clip_tokenizer

    return write_clip_tokenizer(str(tmp_path_factory.mktemp("clip_tok")))
