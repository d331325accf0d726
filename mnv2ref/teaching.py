"""Data and self-checks for the teaching notebooks, wherever they run.

    data = teaching_data()           # prints where the weights came from
    data.model                       # a MobileNetV2 1.0 (real backbone, or seeded random weights)
    data.image("chelsea")            # uint8 RGB
    data.golden("backbone_1.0_224_chelsea")   # TensorFlow's endpoints, or None

    %%needs data.goldens -- TensorFlow's goldens     (first line of a notebook cell:
    ...                                              the cell runs only if the condition holds)

The weights are, in order: the shared test fixtures (`resources.shared_dir()`:
the real backbone, the synthetic 0.35 checkpoint, the goldens, two photos);
else the user's weights (`resources.find_weights()`: `$MNV2REF_WEIGHTS`,
`weights/`, the download cache of `mnv2ref fetch`); else seeded random
weights of the 1.0/224 architecture, with a printed notice. A notebook asks the
returned `TeachingData` what is available and skips what it cannot show
(`%%needs`, registered by `teaching_data()` when it runs inside IPython).
Nothing here prints an absolute path: files are named relative to the folder
they were found in.

`check(name, test)` runs an exercise's checking function and prints one line:
`name: correct`, `name: not attempted yet`, or what is wrong.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from .errors import WeightsError
from .resources import BACKBONE, EXAMPLE_IMAGE, find_weights, shared_dir

SYNTHETIC = "checkpoints/synthetic_mobilenet_v2_0.35_224/model.ckpt"
RANDOM_NOTICE = "random weights: shapes, FLOPs and timings are real, values and classes are not"
RANDOM_SEED = 0


@dataclass
class TeachingData:
    """What a notebook can use. `model` is always there (1.0 unless the user's
    weights say otherwise); the flags say how real it is."""

    model: object                   # mnv2ref.MobileNetV2
    source: str                     # where the weights came from, for people
    real_backbone: bool             # published weights up to layer_19
    real_classifier: bool           # published classifier too: top-5 means something
    shared: Optional[Path] = None   # the fixtures folder, if present
    images: dict = field(default_factory=dict)   # name -> uint8 RGB (H, W, 3)

    @property
    def fixtures(self) -> bool:
        return self.shared is not None

    @property
    def goldens(self) -> bool:
        """TensorFlow's endpoints for the real backbone are available."""
        return self.fixtures and (self.shared / "golden").is_dir() and self.real_backbone

    def fixture(self, relative: str) -> Optional[Path]:
        """A file or checkpoint prefix among the fixtures, or None."""
        if self.shared is None:
            return None
        path = self.shared / relative
        return path if path.exists() or Path(f"{path}.index").is_file() else None

    def golden(self, name: str) -> Optional[dict]:
        """A golden file as {endpoint: array}, or None without the fixtures."""
        from .compare import load_golden

        path = self.fixture(f"golden/{name}.npz")
        return load_golden(path) if path is not None else None

    def image(self, name: str = "chelsea") -> Optional[np.ndarray]:
        """A photo as uint8 RGB: `chelsea` is always there, `coffee` with the fixtures."""
        return self.images.get(name)

    @staticmethod
    def skip_unless(available, needs: str) -> bool:
        """Print why a section is skipped and return True when `available` is false."""
        if not available:
            print(f"skipped: this section {needs}, which this machine does not have "
                  "(see notebooks/README.md, 'Data')")
            return True
        return False


def teaching_data(verbose: bool = True) -> TeachingData:
    """Find the best weights and images available and say which (see the module docstring)."""
    from .model import MobileNetV2
    from .preprocessing import load_image

    shared = shared_dir()
    shared = shared if Path(f"{shared / BACKBONE}.index").is_file() else None
    if shared is not None:
        model = _named(MobileNetV2.from_checkpoint(shared / BACKBONE), f"shared fixtures: {BACKBONE}")
        data = TeachingData(model, model.source, real_backbone=True, real_classifier=False, shared=shared)
    else:
        try:
            path = find_weights()
        except WeightsError:  # none anywhere; a file that is there but broken is an error, not random weights
            path = None
        if path is None:
            model = MobileNetV2.random(seed=RANDOM_SEED)
            data = TeachingData(model, model.source, real_backbone=False, real_classifier=False)
        else:
            model = _named(MobileNetV2.load(path), f"your weights: {path.parent.name}/{path.name}")
            # The fixtures were excluded above, so a classifier here is the published (or the user's own) one.
            data = TeachingData(model, model.source, real_backbone=True,
                                real_classifier=bool(model.num_classes))
    for name in ("chelsea", "coffee"):
        path = data.fixture(f"images/{name}.png")
        if path is not None:
            data.images[name] = load_image(path)
    data.images.setdefault("chelsea", load_image(EXAMPLE_IMAGE))
    _register_needs_magic()
    if verbose:
        print(f"weights: {data.source} ({'real' if data.real_backbone else 'RANDOM'} backbone, "
              f"{'real classifier' if data.real_classifier else 'no real classifier'}); "
              f"goldens: {'yes' if data.goldens else 'no'}; images: {', '.join(data.images)}")
        if not data.real_backbone:
            print(f"NOTE: {RANDOM_NOTICE}. Get real ones with `mnv2ref fetch`.")
    return data


def _register_needs_magic() -> None:
    """In IPython, `%%needs EXPR -- what` runs a cell only when EXPR is true in
    the notebook's namespace, and otherwise prints that it was skipped and why.
    Errors inside a cell that runs propagate as usual."""
    try:
        from IPython import get_ipython
    except ImportError:
        return
    shell = get_ipython()
    if shell is None:
        return

    def needs(line: str, cell: str) -> None:
        condition, _, what = line.partition("--")
        if shell.ev(condition.strip()):
            shell.ex(cell)
        else:
            TeachingData.skip_unless(False, f"needs {what.strip() or condition.strip()}")

    shell.register_magic_function(needs, magic_kind="cell")


def _named(model, display: str):
    """Replace the absolute path a model records as its source by a short name."""
    model.source = display
    model.metadata = {**model.metadata, "source": display}
    return model


def check(name: str, test: Callable[[], None]) -> None:
    """Run `test()` (which calls the student's code and asserts) and print one line:
    `name: correct`, `name: not attempted yet` (the code still raises
    NotImplementedError), `name: not yet: <assertion message>`, or the error
    the student's code raised. Never raises, so a notebook runs as committed.
    (Returns nothing, so that a notebook shows only the printed verdict.)"""
    try:
        test()
    except NotImplementedError:
        print(f"{name}: not attempted yet (fill in the cell above, then run this one again)")
        return
    except AssertionError as error:
        print(f"{name}: not yet: {str(error).splitlines()[0] if str(error) else 'a check failed'}")
        return
    except Exception as error:   # the student's code crashed: say where
        where = traceback.extract_tb(error.__traceback__)[-1]
        print(f"{name}: your code raised {type(error).__name__}: {error} (line {where.lineno})")
        return
    print(f"{name}: correct")
