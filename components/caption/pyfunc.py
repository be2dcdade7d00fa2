"""The captioner as an MLflow pyfunc model: a DataFrame with an `image` column (encoded bytes) in, a `caption`
column out. It carries both models: the CLIP image tower that embeds and the ClipCap captioner (with its
tokenizer). Decoding settings come from the logged model config, or per call as `params`."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pandas as pd

CLIP_ARTIFACT, CAPTIONER_ARTIFACT = "clip_dir", "captioner_dir"


class CaptionModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        import torch

        from components.caption.model import ClipCap
        from components.models.factory import load_model
        from components.models.tokenizer import load_tokenizer

        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.clip = load_model(context.artifacts[CLIP_ARTIFACT]).eval().to(device)
        self.captioner = ClipCap.from_pretrained(context.artifacts[CAPTIONER_ARTIFACT]).to(device)
        self.tokenizer = load_tokenizer(context.artifacts[CAPTIONER_ARTIFACT])
        self.settings = dict(context.model_config or {})

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        settings = {**self.settings, **(params or {})}
        return pd.DataFrame({"caption": caption_images(self.clip, self.captioner, self.tokenizer,
                                                       list(model_input["image"]), **settings)},
                            index=model_input.index)


def caption_images(clip, captioner, tokenizer, images: list[bytes], batch: int = 64, **settings) -> list[str]:
    """Captions for encoded images: CLIP image embeddings, then the captioner (settings: ClipCap.generate's)."""
    import torch

    from components.caption.model import caption_texts
    from components.models.inference import embed_images

    captioner_device = next(captioner.parameters()).device
    captions = []
    for start in range(0, len(images), batch):
        embeddings = torch.from_numpy(embed_images(clip, images[start:start + batch])).to(captioner_device)
        captions.extend(caption_texts(captioner, tokenizer, embeddings, **settings))
    return captions


def log_caption_model(clip_dir: Path, captioner_dir: Path, registered_name: str | None, settings: dict):
    import components
    from mlflow.models import infer_signature

    from components.tracking.pyfunc import serving_requirements

    # The decoding settings are the signature's params: predict(..., params={"method": "greedy"}) overrides them.
    signature = infer_signature(pd.DataFrame({"image": [b""]}), pd.DataFrame({"caption": [""]}), params=settings)
    return mlflow.pyfunc.log_model(
        name="model",
        python_model=CaptionModel(),
        artifacts={CLIP_ARTIFACT: str(clip_dir), CAPTIONER_ARTIFACT: str(captioner_dir)},
        model_config=settings,
        signature=signature,
        code_paths=[str(Path(components.__file__).parent)],
        pip_requirements=serving_requirements(),
        registered_model_name=registered_name,
    )
