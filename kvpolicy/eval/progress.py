"""The progress bar of a long measurement (`kvpolicy eval`, `kvpolicy tune`, `kvpolicy
calibrate`): tqdm's, starting at what a resumed run had already done; silent without tqdm."""

from __future__ import annotations


def progress_bar(total: int, done: int, enabled: bool, desc: str = "kvpolicy eval"):
    try:
        from tqdm import tqdm
        return tqdm(total=total, initial=done, disable=not enabled, desc=desc, unit="run")
    except ImportError:  # pragma: no cover - tqdm comes with transformers
        class Silent:
            def update(self, *_):
                pass

            def close(self):
                pass
        return Silent()
