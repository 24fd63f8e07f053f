"""Golden plans: tests/golden/<model>-<policy>.json, compared exactly.

Regenerate only on purpose: ``make golden`` (pytest --update-golden), then review the diff.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import PRESET_NAMES, captured

from partitioner.api import partition

GOLDEN = Path(__file__).parent / "golden"
MODELS = ["tiny-llama", "tiny-gpt2", "minilm"]


def canonical(plan: dict) -> str:
    return json.dumps(plan, indent=1, sort_keys=True) + "\n"


@pytest.mark.parametrize("preset", PRESET_NAMES)
@pytest.mark.parametrize("name", MODELS)
def test_golden_plan(name, preset, request):
    text = canonical(partition(captured(name), preset).plan())
    path = GOLDEN / f"{name}-{preset}.json"
    if request.config.getoption("--update-golden"):
        path.write_text(text)
        return
    assert path.exists(), f"{path} is missing; run `make golden` to create it"
    assert text == path.read_text(), f"plan differs from {path}; if intended, run `make golden`"


SCRIPT = """
import json, sys, warnings
warnings.simplefilter("ignore")
sys.path.insert(0, {tests!r})
from conftest import captured
from partitioner.api import partition
print(json.dumps(partition(captured("tiny-gpt2"), "slalom").plan(), sort_keys=True))
"""


def test_plan_is_deterministic_across_hash_seeds():
    outputs = []
    for seed in ("0", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        result = subprocess.run(
            [sys.executable, "-c", SCRIPT.format(tests=str(Path(__file__).parent))],
            env=env,
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).parent.parent,
        )
        outputs.append(result.stdout)
    assert outputs[0] == outputs[1]
    assert json.loads(outputs[0])["stages"]
