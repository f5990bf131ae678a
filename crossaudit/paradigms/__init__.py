"""Learning paradigms: how a model's native output becomes scores the audit can attack.

Cross-examination needs one thing of a model: a differentiable score per outcome, so a
trigger can push the suspect to an outcome the witness does not follow. The paradigm says
how to get it from what the model outputs:
- `supervised` and `semi` (trained with few labels plus pseudo-labels): the logits, with
  cross-entropy against the audit label; a semi-supervised classifier has the same
  contract as a supervised one, so only its calibration profile differs;
- `ssl` (self-supervised encoders, embeddings out, no head): cosine similarity to class
  prototypes of the encoder's own clean embeddings (`embedding.PrototypeHead`), so the
  attack loss is an embedding-similarity loss towards a target cluster;
- `lm` (autoregressive language models): next-token loss on token sequences
  (`autoregressive`, a discrete trigger search of its own);
- `captioner` (image-to-text): next-token loss of whole captions, as the log-likelihood
  of each caption of the audit set (`captioning.CaptionScorer`), so the image triggers
  are searched as for a classifier whose classes are captions.
"""

from __future__ import annotations

IMAGE_PARADIGMS = ("supervised", "semi", "ssl")
LM = "lm"
CAPTIONER = "captioner"
PARADIGMS = (*IMAGE_PARADIGMS, LM, CAPTIONER)
AUTO = "auto"


def image_paradigm(requested: str, output_width: int, num_classes: int, accuracy: float) -> str:
    """The paradigm of an image model: as requested, or inferred from its output when
    unambiguous (logits are at least as wide as the audit set has classes, which need not
    include the model's last classes, and mostly right; anything else of another width
    is an embedding). `accuracy` is the argmax's on the samples whose label the output
    could name: an output narrower than the audit set's labels that is still mostly right
    on the rest is a classifier audited with labels that are not its classes, an error."""
    if requested != AUTO:
        if requested not in IMAGE_PARADIGMS:
            raise ValueError(
                f"paradigm {requested!r} does not take labelled images; image paradigms: {IMAGE_PARADIGMS}"
            )
        return requested
    if output_width >= num_classes and accuracy >= 0.5:
        return "supervised"
    if accuracy >= 0.5:
        raise ValueError(
            f"its {output_width} outputs read as logits (argmax right on {accuracy:.0%} of the samples they can "
            f"name), but the audit set's labels run to {num_classes - 1}: labels must be the models' class indices"
        )
    if output_width != num_classes:
        return "ssl"
    raise ValueError(
        f"cannot tell whether a {output_width}-wide output is logits or an embedding "
        f"(argmax accuracy {accuracy:.2f}); pass --paradigm"
    )
