"""predict-dir's Ray engine: the export's own chain (carmodel.predictor.Predictor: decode, find the car,
cut it out, classify, answer) in Ray Data actors, on this machine or across a Ray cluster.

The export's serving files go into Ray's object store once (`ExportShipment`); each actor writes them
to a temporary folder on its own node and loads the Predictor from there (int8 where the export ships
it), so no worker downloads or re-reads the export. Each actor reads its images from their paths: on a
cluster, the directory must be on storage that every node mounts at the same path. Each actor answers
through the handler's own chain (handler.chain.ServedChain, with the server's default limits and
thresholds), so a photo gets the answer the server would give it.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from carmodel.export import ExportDir
from carmodel.images import InputError
from client.result_line import from_details, from_error
from handler.inputs import Options


@dataclass(frozen=True)
class ExportShipment:
    model_name: str
    files: dict[str, bytes]  # the serving files (carmodel.export.ExportDir.serving_files) by name

    @classmethod
    def of(cls, folder: Path) -> ExportShipment:
        export = ExportDir(folder)
        export.validate()
        return cls(export.model_name, {path.name: path.read_bytes() for path in export.serving_files()})

    def unpack(self) -> ExportDir:
        folder = Path(tempfile.mkdtemp(prefix=f"{self.model_name}_"))
        for name, data in self.files.items():
            (folder / name).write_bytes(data)
        return ExportDir(folder)


@contextlib.contextmanager
def connect(address: str | None) -> Iterator[None]:
    """Ray on this machine (every core), or the cluster at `address` (ray://head:10001)."""
    import ray

    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        yield
    finally:
        ray.shutdown()


class ChainActor:
    """One worker's served chain; a batch of image paths -> their answers as predict-dir's result lines."""

    def __init__(self, shipment_ref: object, topk: int | None):
        import ray

        from handler.chain import ServedChain
        from handler.settings import HandlerSettings

        shipment: ExportShipment = ray.get(shipment_ref)  # Ray Data hands constructor arguments over unresolved
        # One core per actor, and no decoding budget: nothing waits behind an offline job's large images.
        settings = HandlerSettings(threads=1, batch_decode_pixels=0)
        self.chain = ServedChain.for_export(shipment.unpack(), settings)
        self.options = Options(topk=topk)

    def _open(self, path: str):
        try:
            return self.chain.refusing(self.chain.open, Path(path).read_bytes(), self.options)
        except OSError as err:
            return InputError(None, f"cannot read file: {type(err).__name__}: {err}")

    def __call__(self, batch: dict) -> dict:
        results = [
            from_error(a.message, a.status) if isinstance(a, InputError) else from_details(a.details())
            for a in self.chain(self.chain.opened(self._open, batch["path"]))
        ]
        return {"file": list(batch["file"]), "result": [json.dumps(r) for r in results]}


def answerer(
    shipment: ExportShipment, directory: Path, topk: int | None, actors: int, batch_size: int
) -> Callable[[list[Path]], Iterator[tuple[str, dict]]]:
    """predict-dir's `answer(images)` for the Ray engine: (file, result) as batches complete."""
    import ray

    def answer(images: list[Path]) -> Iterator[tuple[str, dict]]:
        items = [{"file": path.relative_to(directory).as_posix(), "path": str(path.resolve())} for path in images]
        dataset = ray.data.from_items(items).map_batches(
            ChainActor,
            fn_constructor_args=(ray.put(shipment), topk),
            batch_size=batch_size,
            concurrency=actors,
            num_cpus=1,
        )
        for row in dataset.iter_rows():
            yield row["file"], json.loads(row["result"])

    return answer
