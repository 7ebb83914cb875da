"""What a run records of its dataset: name, content digest, source and split sizes, logged
as an MLflow run input (the runs table's Dataset column)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mlflow.entities import Dataset, DatasetInput, InputTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

if TYPE_CHECKING:  # a type only: the tracking layer does not load data
    from dtp_search.data import ImageDataset


@dataclass(frozen=True)
class DatasetInfo:
    """What a run records of its dataset (``mlflow.log_input``): name, content digest,
    where it came from and its split sizes."""

    name: str
    digest: str
    source: str
    profile: dict[str, Any]

    def entity(self) -> Dataset:
        return Dataset(
            name=self.name,
            digest=self.digest,
            source_type="local",
            source=json.dumps({"uri": self.source}),
            profile=json.dumps(self.profile),
        )


def describe_dataset(dataset: ImageDataset, source: str) -> DatasetInfo:
    """Name, content digest (SHA-1 of both splits' images and labels) and split sizes.

    The digest is :meth:`ImageDataset.content_digest`: for splits in memory the hash of
    their tensors; for streamed splits the same hash, computed while the load decoded
    them once (:func:`dtp_search.data.streaming.scan`; cached for ImageFolder trees) without
    holding them in memory. Whether a split is streamed therefore never changes the
    digest, and the study's drift check compares the data, not the path it took."""
    digest = dataset.content_digest()
    profile = {
        "train": len(dataset.train.labels),
        "test": len(dataset.test.labels),
        "classes": dataset.num_classes,
        "shape": list(dataset.input_shape),
    }
    return DatasetInfo(dataset.name, digest[:16], source, profile)


def log_dataset(client: MlflowClient, run_id: str, dataset: DatasetInfo, context: str) -> None:
    """Record ``dataset`` as an input of run ``run_id``, used as ``context`` (``train``,
    ``train+test``)."""
    client.log_inputs(
        run_id,
        datasets=[
            DatasetInput(
                dataset.entity(), tags=[InputTag(key=MLFLOW_DATASET_CONTEXT, value=context)]
            )
        ],
    )
