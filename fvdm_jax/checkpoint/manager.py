"""Training checkpoints: state (params, EMA, optimizer) + data-iterator state + config JSON +
fingerprints, through one orbax CheckpointManager; the newest one that reads back and verifies is
restored, damaged ones are moved aside. Inference checkpoints are fvdm_jax/checkpoint/inference.py's.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from fvdm_jax.checkpoint.inference import plain_config
from fvdm_jax.errors import ConfigError
from fvdm_jax.runtime import files

QUARANTINE_DIR = "checkpoints_damaged"  # WORKDIR/<this>/<step>: checkpoints that failed to verify


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written, or no good one can be read back (one line)."""


CAUSE_CHARS = 300  # an error's one line keeps this much of the innermost cause


def _cause(error: BaseException) -> str:
    """The innermost cause of an orbax / tensorstore error, in one line."""
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__
    text = " ".join(str(error).split()) or type(error).__name__
    return f"{type(error).__name__}: {text[:CAUSE_CHARS]}"


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _agree(problem: str | None) -> str | None:
    """Every process learns whether any process failed (each reads its own shards)."""
    if jax.process_count() == 1:
        return problem
    from jax.experimental import multihost_utils

    failed = multihost_utils.process_allgather(np.asarray(problem is not None))
    return problem or ("unreadable on another process" if np.any(failed) else None)


class TrainCheckpointer:
    """An orbax CheckpointManager over WORKDIR/checkpoints; the same path on every host."""

    def __init__(self, workdir: str, checkpoint_config: Mapping[str, Any], read_only: bool = False):
        """read_only (sampling, evaluation, export): never creates WORKDIR/checkpoints; a missing
        folder is a FileNotFoundError that says to train first."""
        import orbax.checkpoint as ocp

        if int(checkpoint_config["every_steps"]) < 1 or int(checkpoint_config["keep"]) < 1:
            raise ConfigError("checkpoint.every_steps and checkpoint.keep must be at least 1")
        self.directory = files.join(files.resolve(workdir), "checkpoints")
        self.every_steps = int(checkpoint_config["every_steps"])
        if read_only and not files.isdir(self.directory):
            raise FileNotFoundError(
                f"no checkpoint under {self.directory}: train first (--mode=train), or set "
                f"--config.sample.checkpoint=DIR (an exported or converted inference checkpoint)"
            )
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=self.every_steps,
            max_to_keep=int(checkpoint_config["keep"]),
            enable_async_checkpointing=bool(checkpoint_config["async_save"]),
            read_only=read_only,
            create=not read_only,
            # The tmp folders of saves a crash cut short (an XL one holds ~11 GB), removed at start.
            cleanup_tmp_directories=not read_only,
        )
        self.read_only = read_only
        self.quarantine_directory = files.join(files.resolve(workdir), QUARANTINE_DIR)
        self.manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_names=("state", "config", "fingerprints"),
        )

    def _remove_unfinished_saves(self) -> None:
        """After a failed save: deletes its tmp folder (orbax names them, and removes those of a
        crashed run itself at start: cleanup_tmp_directories). Process 0 only."""
        import orbax.checkpoint as ocp

        if jax.process_index() != 0 or not files.isdir(self.directory):
            return
        for name in ocp.path.step.tmp_checkpoints(self.directory):
            logging.warning("removing the unfinished save %s", files.join(self.directory, name))
            files.rmtree(files.join(self.directory, name))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, config: Mapping[str, Any], force=False) -> bool:
        import orbax.checkpoint as ocp
        from flax import serialization

        from fvdm_jax.checkpoint.integrity import fingerprints

        state_dict = serialization.to_state_dict(state)
        items = dict(
            state=ocp.args.StandardSave(state_dict),
            config=ocp.args.JsonSave(plain_config(config)),
            # Checksums of every array, taken on the devices before the (async) write.
            fingerprints=ocp.args.JsonSave(fingerprints(state_dict)),
        )
        try:
            return self.manager.save(step, args=ocp.args.Composite(**items), force=force)
        except Exception as error:  # a synchronous failure (the async ones: check_for_errors)
            self._remove_unfinished_saves()
            raise CheckpointError(f"saving checkpoint step {step} under {self.directory} failed: "
                                  f"{_cause(error)}; the checkpoints saved before are intact") from error

    def check_for_errors(self) -> None:
        """Raises CheckpointError (one line, with the cause) if an async save has failed since
        the last call; the failed save's tmp folder is removed, earlier checkpoints stay."""
        try:
            self.manager.check_for_errors()
        except Exception as error:  # orbax re-raises the writer thread's exception as is
            self._remove_unfinished_saves()
            raise CheckpointError(f"saving a checkpoint under {self.directory} failed: "
                                  f"{_cause(error)}; the checkpoints saved before are intact") from error

    def saved_fingerprints(self, step: int) -> dict | None:
        """The fingerprints saved with `step`; None for a checkpoint written without them."""
        import orbax.checkpoint as ocp

        if not files.isdir(files.join(self.directory, str(step), "fingerprints")):
            return None
        restored = self.manager.restore(step, args=ocp.args.Composite(fingerprints=ocp.args.JsonRestore()))
        return restored["fingerprints"]

    def quarantine(self, step: int, reason: str) -> str:
        """Moves a damaged checkpoint out of the way (never deletes it): WORKDIR/checkpoints_damaged/
        <step>; returns where it went. A read-only checkpointer only reports it."""
        source = files.join(self.directory, str(step))
        target = files.join(self.quarantine_directory, str(step))
        if self.read_only:
            logging.error("checkpoint %s is damaged (%s); skipped", source, reason)
            return source
        if jax.process_index() == 0 and files.isdir(source):
            files.makedirs(self.quarantine_directory)
            suffix = 0
            while files.exists(target):
                suffix += 1
                target = files.join(self.quarantine_directory, f"{step}.{suffix}")
            files.move(source, target)
        _sync(f"fvdm_jax_quarantine_{step}")
        self.manager.reload()
        logging.error("checkpoint %s is damaged (%s); moved to %s, falling back to the previous one",
                      source, reason, target)
        return target

    def restore_newest_good(self, abstract_state, check_config=None):
        """(step, state, saved config) of the newest checkpoint that reads back, matches its
        fingerprints and holds only finite numbers; each one that does not is moved aside
        (`quarantine`) and the next older one is tried. None if there is no checkpoint at all;
        CheckpointError if none is good. check_config(saved config, step) may refuse a changed
        recipe (its ConfigError passes through: a refusal, not damage)."""
        from flax import serialization

        from fvdm_jax.checkpoint.integrity import compare, fingerprints, non_finite, shape_mismatches

        steps = sorted(self.manager.all_steps(), reverse=True)
        if not steps:
            return None
        target = serialization.to_state_dict(abstract_state)
        for step in steps:
            try:
                saved_config = self.saved_config(step)
                saved = self.saved_fingerprints(step)
            except Exception as error:  # noqa: BLE001 - a damaged file raises anything
                self.quarantine(step, f"unreadable metadata: {_cause(error)}")
                continue
            if check_config is not None:
                check_config(saved_config, step)
            if saved is not None:
                wrong = shape_mismatches(saved, target)
                if wrong:
                    raise ConfigError(f"checkpoint step {step} holds other shapes than this config "
                                      f"builds ({len(wrong)} arrays, e.g. {wrong[0]}): the model "
                                      f"config changed; use the one it was trained with")
            problem = None
            try:
                state = self.restore_state(step, abstract_state)
            except Exception as error:  # noqa: BLE001
                problem = f"unreadable: {_cause(error)}"
            problem = _agree(problem)
            if problem is None:
                state_dict = serialization.to_state_dict(state)
                if saved is None:
                    logging.warning("checkpoint step %d has no fingerprints (written by an older "
                                    "version): not verified", step)
                else:
                    differ = compare(saved, fingerprints(state_dict))
                    if differ:
                        problem = f"{len(differ)} arrays differ from their fingerprints, e.g. {differ[0]}"
                if problem is None:
                    bad = non_finite(state_dict)
                    if bad:
                        problem = f"NaN or inf in {len(bad)} arrays, e.g. {bad[0]}"
            if problem is None:
                return step, state, saved_config
            self.quarantine(step, problem)
        raise CheckpointError(f"no good checkpoint left under {self.directory} (the damaged ones are "
                              f"in {self.quarantine_directory}); remove the folder to start afresh")

    def saved_config(self, step: int) -> dict:
        import orbax.checkpoint as ocp

        restored = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        return restored["config"]

    def restore_state(self, step: int, abstract_state):
        """Restores the state onto `abstract_state` (ShapeDtypeStructs carrying shardings), so a
        checkpoint written on one mesh restores exactly onto another."""
        import orbax.checkpoint as ocp
        from flax import serialization

        target = serialization.to_state_dict(abstract_state)
        restored = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
        )
        return serialization.from_state_dict(abstract_state, restored["state"])

    def restore_ema(self, step: int, abstract_ema):
        """Only the EMA weights of the checkpoint at `step`, onto abstract_ema ({'params': ...}
        of ShapeDtypeStructs with shardings): a partial restore that reads no optimizer state
        and no raw weights (about a quarter of the state's bytes)."""
        import orbax.checkpoint as ocp

        target = {"ema_params": abstract_ema}
        path = files.join(self.directory, str(step), "state")
        with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as checkpointer:
            restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
                target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                partial_restore=True))
        return restored["ema_params"]

    def restore_newest_good_ema(self, abstract_ema_for):
        """(step, EMA params) of the newest checkpoint whose EMA weights read back and match their
        fingerprints; damaged ones are skipped with an error line (sampling never moves files).
        abstract_ema_for(saved config) -> the abstract EMA tree of that checkpoint's model."""
        from fvdm_jax.checkpoint.integrity import compare, fingerprints, non_finite

        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                saved_config = self.saved_config(step)
                saved = self.saved_fingerprints(step)
                ema = self.restore_ema(step, abstract_ema_for(saved_config))
            except ConfigError:
                raise
            except Exception as error:  # noqa: BLE001
                self.quarantine(step, f"unreadable: {_cause(error)}")
                continue
            tree = {"ema_params": ema}
            differ = [] if saved is None else compare(saved, fingerprints(tree), prefix="ema_params/")
            bad = non_finite(tree)
            if not differ and not bad:
                return step, ema, saved_config
            self.quarantine(step, f"EMA arrays differ from their fingerprints ({differ[:1]})" if differ
                            else f"NaN or inf in the EMA weights ({bad[:1]})")
        raise CheckpointError(f"no good checkpoint under {self.directory} to sample from")

    def wait_until_finished(self):
        try:
            self.manager.wait_until_finished()
        except Exception as error:
            self._remove_unfinished_saves()
            raise CheckpointError(f"saving a checkpoint under {self.directory} failed: "
                                  f"{_cause(error)}; the checkpoints saved before are intact") from error
        self.check_for_errors()

    def close(self):
        self.manager.close()
