import os
import sys
from pathlib import Path

# one thread per process (as torchrun sets it): the scripts the tests start inherit it, the runs made in this process
# match theirs bit for bit (kill-and-resume), and `pytest -n 2` puts one test on each of the 2 cores
os.environ["OMP_NUM_THREADS"] = "1"
import torch  # noqa: E402

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# the tests that start processes and train (20-70 s each on the 2-core machine) go first: `pytest -n 2` hands tests
# out in collection order, and one of them left for the end keeps one core busy while the other idles
SLOW = ("complete_pipeline", "two_ranks", "dead_or_stalled", "kill_and_resume", "sigkill", "same_seed_same_loss",
        "raises_heldout", "toy_run_router", "regeneration_is_byte_identical", "cli_answers", "stage2_lora_exports")


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: not any(s in item.name for s in SLOW))  # stable: the rest keep their order
