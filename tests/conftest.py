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
