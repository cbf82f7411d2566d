"""Every person's TTP gain, sorted, for the transformer's three TTP settings (default, flip term, pseudo-labels), on
the test and the fresh persons: the means hide who loses, the sorted curves show it.

`python scripts/plot_ttp_gains.py` reads the committed JSONs under docs/reproduce and writes
docs/reproduce/pseudo/per_person_gains.png."""
import json
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

DOCS = Path(__file__).resolve().parents[1] / "docs/reproduce"
# label, key in fresh_persons.json, the test persons' per-person scores, their TTP evaluations' tag
SETTINGS = [("default TTP", "default", DOCS / "trust_region/default/per_person.json", "dccebcc3"),
            ("flip term", "flip term", DOCS / "flip/per_person.json", "d31f8dba"),
            ("pseudo-labels (300)", "pseudo-labels", DOCS / "pseudo/per_person.json", "7d9f0ed2")]


def gains_on_test_persons(path: Path, tag: str, scenario: str) -> np.ndarray:
    runs = json.loads(path.read_text())
    gains = []
    for seed in range(3):
        none = {p["person_id"]: p["pck@0.2"] for p in runs[f"transformer-s{seed}-none-dark"]["persons"]}
        ttp = {p["person_id"]: p["pck@0.2"] for p in runs[f"transformer-s{seed}-{scenario}-dark-{tag}"]["persons"]}
        gains += [100 * (ttp[k] - none[k]) for k in none]
    return np.array(gains)


def main() -> None:
    fresh = json.loads((DOCS / "pseudo/fresh_persons.json").read_text())
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharey=True)
    for col, scenario in enumerate(("online", "offline")):
        for row, persons in enumerate(("test", "fresh")):
            ax = axes[row, col]
            for label, fresh_key, path, tag in SETTINGS:
                if persons == "test":
                    gains = gains_on_test_persons(path, tag, scenario)
                else:
                    gains = np.array(fresh[scenario][fresh_key])
                ax.plot(np.sort(gains), label=f"{label}: {gains.mean():+.2f}, {int((gains < -1).sum())} lose > 1")
            ax.axhline(0, color="k", lw=0.6)
            ax.axhline(-1, color="k", lw=0.6, ls=":")
            ax.set_title(f"{persons} persons, {scenario} TTP (90 person x seed pairs)")
            ax.set_xlabel("pairs, sorted by gain")
            ax.set_ylabel("PCK@0.2 gain over no TTP (points)")
            ax.legend(fontsize=8)
    fig.tight_layout()
    out = DOCS / "pseudo/per_person_gains.png"
    fig.savefig(out, dpi=110)
    print("wrote", out)


if __name__ == "__main__":
    main()
