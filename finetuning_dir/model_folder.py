"""Writing a model into an output folder the way an Azure ML job hands it over.

A command job's outputs (mode rw_mount, the default for mlflow_model) are mount points: each
exists, is empty, and can be neither removed nor replaced (EBUSY), and nothing can be renamed onto
it from another file system (EXDEV). So a model is saved into a scratch folder on the node's own
disk and then copied into the output, file by file, its MLmodel file last. A folder without
MLmodel is no MLflow model: a job stopped half-way leaves nothing that passes for a finished one.
"""

import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

MLMODEL = "MLmodel"


class OutputFolderError(ValueError):
    """The output folder cannot take a model; the message says why and what to do."""


def check_empty(output_dir, flag: str) -> None:
    """Stop unless `output_dir` is absent or an empty folder (what Azure ML hands a job)."""
    output_dir = Path(output_dir)
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
        raise OutputFolderError(f"{flag} {output_dir} is not empty; pass a new folder (nothing in it was touched)")


def copy_into(source: Path, output_dir: Path) -> None:
    """Copy the files under `source` into `output_dir`, the root MLmodel last; never touch the folder itself."""
    files = sorted(p for p in source.rglob("*") if p.is_file())
    files.sort(key=lambda p: p == source / MLMODEL)  # stable: only MLmodel moves to the end
    try:
        for path in files:
            target = output_dir / path.relative_to(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)  # contents only: a mount may refuse chmod or utime
    except BaseException:
        clear(output_dir)
        raise


def clear(output_dir: Path) -> None:
    """Remove what is inside `output_dir` (never the folder: it may be a mount point)."""
    for child in output_dir.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)


@contextmanager
def staged(output_dir, flag: str = "output folder"):
    """Yield a new local folder to save a model into; when the block succeeds, copy it into `output_dir`.

    Scratch space comes from the temporary folder (TMPDIR), on the node's own disk, and is removed
    afterwards. A model that fails to save or copy leaves `output_dir` as empty as it was.
    """
    output_dir = Path(output_dir)
    check_empty(output_dir, flag)
    scratch = Path(tempfile.mkdtemp(prefix=f"{output_dir.name}-"))
    try:
        yield scratch / "model"
        if not (scratch / "model" / MLMODEL).is_file():
            raise OutputFolderError(f"no {MLMODEL} was written for {output_dir}")
        copy_into(scratch / "model", output_dir)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
