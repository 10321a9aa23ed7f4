"""The score table: each score's name, what it estimates and its default sample count, and the default
score and guard. One place: `scores.py` computes what this lists (and checks it does, on import), the
decision, the CLI and the docs read it. No torch.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ScoreSpec:
    """What a score is called, what it estimates, and its default sample count (scores.py computes it)."""

    name: str
    default_samples: int
    summary: str


SCORE_SPECS: dict[str, ScoreSpec] = {
    "elbo-ic-nn": ScoreSpec(
        "elbo-ic-nn", 1, "elbo-ic plus the latent code's distance to its 5 nearest training codes, each over its spread"
    ),
    "elbo": ScoreSpec("elbo", 1, "-ELBO: reconstruction cost + KL(q(z|x) || N(0, I))"),
    "elbo-ic": ScoreSpec("elbo-ic", 1, "-ELBO in bits minus the PNG-compressed length in bits (Serra et al. 2020)"),
    "kl": ScoreSpec("kl", 1, "KL(q(z|x) || N(0, I)): how far the image's latent code is from the prior"),
    "iwae": ScoreSpec("iwae", 16, "-log p(x) by the importance-weighted bound (Burda et al. 2016)"),
    "recon-prob": ScoreSpec("recon-prob", 16, "-log of the mean decoder likelihood over z ~ q(z|x) (An & Cho 2015)"),
}
SCORE_NAMES: tuple[str, ...] = tuple(SCORE_SPECS)
MAX_SAMPLES = 10_000

DEFAULT_SCORE = "elbo-ic-nn"  # measured best on one-class MNIST (benchmarks/one_class.py)
DEFAULT_GUARD = "kl"  # catches shrunk, noisy, dimmed, blurred frames (benchmarks/corruptions.py)
GUARDS: tuple[str, ...] = ("kl",)


def default_samples() -> dict[str, int]:
    return {name: spec.default_samples for name, spec in SCORE_SPECS.items()}
