"""cvjax.data: locally generated TFDS datasets (shapes), the dataset registry and grain input pipelines."""

from cvjax.data.datasets import DATASETS, DatasetSource
from cvjax.data.pipeline import Pipeline, PipelineIterator, create_pipeline

__all__ = ['DATASETS', 'DatasetSource', 'Pipeline', 'PipelineIterator', 'create_pipeline']
