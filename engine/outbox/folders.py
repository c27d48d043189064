"""The outbox: per-attempt work folders, publishing committed outputs, result.json and summary.json.

Handlers write into `outbox/.attempts/<session>/r<run>-s<step>-a<attempt>/`. Only after
`step.completed` commits are those files renamed into `outbox/<session>/` (batch items:
`outbox/batches/<batch>/item-<n>/`); later runs of a restarted session go to `run-<n>/` inside.
Every file is written under a temporary name and renamed; result.json is written last.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from engine.files import atomic_write_json
from engine.outbox.sheets import contact_sheet, seed_label
from engine.outbox.thumbs import make_thumbnail
from engine.store import Store

ATTEMPTS = ".attempts"
log = logging.getLogger("engine.outbox")


def make_empty(folder: Path, tries: int = 20) -> Path:
    """`folder` made anew and empty (whatever an earlier life of its attempt left is removed).

    Its parent, the session's folder under .attempts, is removed whenever it is empty: by the
    discard of the session's last step (whose files may still be published while its next step
    starts) or by another runner's sweep. Between the parent's mkdir and the folder's own such a
    removal makes mkdir fail with ENOENT, so it is made again."""
    shutil.rmtree(folder, ignore_errors=True)
    for _ in range(tries - 1):
        try:
            folder.mkdir(parents=True)
            return folder
        except FileNotFoundError:
            continue
    folder.mkdir(parents=True)
    return folder


class Outbox:
    def __init__(self, root: Path) -> None:
        self.root = root

    def session_dir(self, session_id: str, run: int, batch_id: str | None = None, item_index: int | None = None) -> Path:
        base = self.root / "batches" / batch_id / f"item-{item_index:05d}" if batch_id else self.root / session_id
        return base if run == 1 else base / f"run-{run}"

    def dir_of(self, session: dict) -> Path:
        return self.session_dir(session["session_id"], session["run"], session["batch_id"], session["item_index"])

    def batch_dir(self, batch_id: str) -> Path:
        return self.root / "batches" / batch_id

    def contact_sheet(self, batch_id: str) -> Path:
        return self.batch_dir(batch_id) / "contact-sheet.png"

    def item_runs(self, batch_id: str, item_index: int) -> list[Path]:
        """A batch item's folders, its first run's first and its newest last."""
        item = self.batch_dir(batch_id) / f"item-{item_index:05d}"
        later = sorted(item.glob("run-*"), key=lambda f: int(f.name[4:]) if f.name[4:].isdigit() else 0)
        return [item, *later]

    def item_images(self, batch_id: str, item_index: int) -> list[Path]:
        """The images of a batch item's newest run that has its result.json."""
        for run in reversed(self.item_runs(batch_id, item_index)):
            try:
                return [run / name for name in json.loads((run / "result.json").read_text()).get("images", [])]
            except (OSError, ValueError):
                continue
        return []

    def attempt_dir(self, session_id: str, run: int, step_index: int, attempt: int) -> Path:
        return self.root / ATTEMPTS / session_id / f"r{run}-s{step_index}-a{attempt}"

    def publish(self, attempt_dir: Path | None, target_dir: Path, names: list[str]) -> None:
        """Rename a committed attempt's files into place; safe to repeat after a crash.
        `attempt_dir` None: the attempt wrote nothing."""
        if attempt_dir is None:
            return
        if names:
            target_dir.mkdir(parents=True, exist_ok=True)
        for name in names:
            source = attempt_dir / name
            if source.exists():
                try:
                    os.replace(source, target_dir / name)
                except FileNotFoundError:
                    if source.exists():
                        raise
                    # another runner's sweep (engine.run.recovery) published it meanwhile
        self.discard(attempt_dir)

    def discard(self, attempt_dir: Path | None) -> None:
        if attempt_dir is None or not attempt_dir.exists():
            return
        shutil.rmtree(attempt_dir, ignore_errors=True)
        parent = attempt_dir.parent
        try:
            parent.rmdir()
        except OSError:
            pass

    def published(self, session: dict, output: dict[str, Any]) -> dict[str, Any]:
        """A step's output with absolute paths, wherever its files are right now."""
        folder = self.dir_of(session)
        resolved = {"data": output.get("data", {})}
        for key in ("images", "files"):
            resolved[key] = [str(folder / name) for name in output.get(key, [])]
        return resolved

    # result.json and summary.json ----------------------------------------------------------

    def write_result(self, store: Store, session_id: str, rows: tuple | None = None) -> Path | None:
        """result.json of a session, from its rows (as committed; read from the store if not given)."""
        if rows is None:
            rows = store.row("sessions", (session_id,), children="steps")
            if rows[0] is None:
                return None
        session, step_rows = dict(rows[0]), rows[1]
        folder = self.dir_of(session)
        params = json.loads(session["params"])
        report_steps, images, files = [], [], []
        for row in step_rows:
            output = json.loads(row["output"]) if row["output"] else {}
            data = output.get("data", {})
            report_steps.append({
                "index": row["step_index"], "type": row["step_type"], "domain": row["domain"],
                "status": row["status"], "attempts": row["attempts"], "duration_s": row["duration_s"],
                "peak_memory_bytes": data.get("peak_memory_bytes"), "error_code": row["error_code"],
                "error_message": row["error_message"], "data": data,
            })
            if output.get("images"):
                images = output["images"]
            files += output.get("images", []) + output.get("files", [])
        result = {
            "session_id": session_id, "job_id": session["job_id"], "workflow_id": session["workflow_id"],
            "status": session["status"], "run": session["run"], "batch_id": session["batch_id"],
            "item_index": session["item_index"], "params": params, "seed": params.get("seed"),
            "created_at": session["created_at"], "started_at": session["started_at"],
            "finished_at": session["finished_at"], "steps": report_steps, "images": images,
            "artifacts": sorted(set(files)),
            "error": {"code": session["error_code"], "message": session["error_message"]}
            if session["error_code"] else None,
        }
        for name in images:  # before result.json: a listed image has its thumbnail
            _thumbnail(folder / name)
        path = folder / "result.json"
        atomic_write_json(path, result)
        ended = "%s %s%s" % (session["status"], f"{len(images)} image(s) in {folder}" if images else f"see {path}",
                             f" ({session['error_code']}: {session['error_message']})" if session["error_code"] else "")
        log.log(logging.WARNING if session["status"] == "failed" else logging.INFO, "session %s (job %s) %s",
                session_id, session["job_id"] or "-", ended)
        return path

    def write_summary(self, store: Store, batch_id: str) -> Path | None:
        batch, rows = store.row("batches", (batch_id,), children="items")
        if batch is None:
            return None
        summary = {
            "batch_id": batch_id, "job_id": batch["job_id"], "status": batch["status"], "run": batch["run"],
            "total_items": batch["total_items"], "completed_items": batch["completed_items"],
            "failed_items": batch["failed_items"], "cancelled_items": batch["cancelled_items"],
            "created_at": batch["created_at"], "finished_at": batch["finished_at"],
            "items": [{"index": r["item_index"], "session_id": r["session_id"], "status": r["status"],
                       "folder": f"item-{r['item_index']:05d}"} for r in rows],
        }
        self._batch_sheet(batch_id, rows)
        path = self.batch_dir(batch_id) / "summary.json"
        atomic_write_json(path, summary)
        return path

    def _batch_sheet(self, batch_id: str, rows) -> None:
        """contact-sheet.png: every item's images, labelled with the item index and seed."""
        tiles = [(image, f"#{row['item_index']} {seed_label(image.name)}") for row in rows
                 if row["status"] == "completed" for image in self.item_images(batch_id, row["item_index"])]
        contact_sheet(tiles, self.contact_sheet(batch_id))


def _thumbnail(png: Path) -> None:
    """A published image's thumbnail; one that cannot be made (a file removed by hand, say) is
    made on demand when it is asked for."""
    try:
        make_thumbnail(png)
    except (OSError, ValueError) as exc:
        log.warning("no thumbnail of %s: %s", png, exc)
