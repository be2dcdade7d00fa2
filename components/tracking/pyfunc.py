"""MLflow pyfunc wrapper: images and/or texts in, L2-normalised embeddings out, for any contrastive family.

Input: a DataFrame with an `image` column (encoded image bytes) and/or a `text` column. Output: a DataFrame
with `image_embedding` and/or `text_embedding` (lists of floats) for the rows where the input is present.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pandas as pd

MODEL_ARTIFACT = "model_dir"
# What a logged model needs at predict time (the package itself travels as code_paths).
SERVING_PACKAGES = ("torch", "transformers", "tokenizers", "safetensors", "pillow", "numpy", "pandas", "cloudpickle")


def serving_requirements() -> list[str]:
    """SERVING_PACKAGES pinned to the versions that trained the model. Given explicitly because MLflow's own
    inference loads the model in a subprocess (~15 s per logged model) and lists this package, which is not on
    PyPI."""
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in SERVING_PACKAGES]


class EmbeddingModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from components.models.factory import load_model_and_text

        self.model, self.text = load_model_and_text(Path(context.artifacts[MODEL_ARTIFACT]))
        self.model.eval()

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        from components.models.inference import embed_images, embed_texts

        out = pd.DataFrame(index=model_input.index)
        if "image" in model_input:
            images = model_input["image"]
            present = images.notna()
            vectors = embed_images(self.model, list(images[present])) if present.any() else np.zeros((0, 0))
            out["image_embedding"] = _column(vectors, present)
        if "text" in model_input:
            texts = model_input["text"]
            present = texts.notna()
            vectors = embed_texts(self.model, self.text, list(texts[present])) if present.any() else np.zeros((0, 0))
            out["text_embedding"] = _column(vectors, present)
        return out


def _column(vectors: np.ndarray, present: pd.Series) -> list:
    rows = iter(vectors.tolist())
    return [next(rows) if p else None for p in present]


def log_embedding_model(export_dir: Path, registered_name: str | None):
    """Log the export as the run's `model` (pyfunc) and register it; returns the ModelInfo."""
    import components

    return mlflow.pyfunc.log_model(
        name="model",
        python_model=EmbeddingModel(),
        artifacts={MODEL_ARTIFACT: str(export_dir)},
        code_paths=[str(Path(components.__file__).parent)],
        pip_requirements=serving_requirements(),
        registered_model_name=registered_name,
    )
