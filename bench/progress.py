"""Whether progress bars are wanted: off when ``TQDM_DISABLE`` is set.

tqdm applies ``TQDM_DISABLE`` only to bars that do not pass ``disable`` themselves; the harness's bars that do
(generation, diffusion sampling, MoA features) read `BARS_OFF`. Parallel sweeps set the variable (`bench.__main__`),
since their jobs share one terminal.
"""

import os

BARS_OFF = bool(os.environ.get("TQDM_DISABLE"))
