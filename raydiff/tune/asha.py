"""ASHA whose rungs survive an interrupted sweep.

Tune's restore brings back trials and the search algorithm but rebuilds the scheduler from the object pickled when
the sweep began, i.e. with empty rungs. A resumed sweep would then compare its remaining trials with nothing: the
first trial to reach each rung always continues, so a preemption could let poor trials run to max_steps. This
scheduler writes its rungs to `scheduler/asha_state.json` in the sweep directory whenever they change, and reads
them back when the resumed sweep adds its first trial. Not at the directory's top level: on a restore Tune copies
the top-level .json/.pkl files to its staging directory and keeps uploading those copies back over the originals.
"""

from __future__ import annotations

import json

from ray.tune.schedulers import ASHAScheduler

from raydiff import compat, storage


STATE_KEYS = {"brackets", "trial_bracket", "num_stopped"}


def state_path(sweep_dir: str) -> str:
    return storage.join(sweep_dir, "scheduler", "asha_state.json")


class ResumableASHA(ASHAScheduler):
    def __init__(self, state_path: str, **asha_kwargs):
        super().__init__(**asha_kwargs)
        self._state_path = state_path
        self._state_loaded = False  # the instance Tune unpickles on resume is the one built here, so False again
        self._written = ""
        self._saved_trial_bracket: dict[str, int] = {}

    # --------------------------------------------------------------- state, as JSON a person can read

    def state(self) -> dict:
        """Per bracket, per rung milestone: {trial_id: recorded reward}; and which bracket holds each live trial."""
        all_brackets = compat.asha_brackets(self)
        brackets = [[[milestone, dict(recorded)] for milestone, recorded in compat.asha_rungs(b)] for b in all_brackets]
        trials = {tid: all_brackets.index(b) for tid, b in compat.asha_trial_brackets(self).items()}
        return {"brackets": brackets, "trial_bracket": trials, "num_stopped": compat.asha_num_stopped(self)}

    def _state_text(self) -> str:
        return json.dumps(self.state(), indent=1, sort_keys=True)

    def save_state(self) -> None:
        text = self._state_text()
        if text != self._written:  # most reports carry no val_loss and change nothing
            storage.write_text(self._state_path, text)
            self._written = text

    def load_state(self) -> None:
        self._state_loaded = True
        if not storage.exists(self._state_path):
            return
        saved = self._read_state()
        brackets = compat.asha_brackets(self)
        if len(saved["brackets"]) != len(brackets):
            raise ValueError(f"{self._state_path}: {len(saved['brackets'])} ASHA brackets saved, the sweep has "
                             f"{len(brackets)}; the file belongs to another sweep")
        for bracket, saved_rungs in zip(brackets, saved["brackets"]):
            rungs = compat.asha_rungs(bracket)
            milestones, saved_milestones = [m for m, _ in rungs], [m for m, _ in saved_rungs]
            if milestones != saved_milestones:
                raise ValueError(f"{self._state_path}: rungs at steps {saved_milestones} saved, the sweep's are at "
                                 f"{milestones} (grace_period, reduction_factor or max_steps changed)")
            for (_, recorded), (_, saved_recorded) in zip(rungs, saved_rungs):
                recorded.update(saved_recorded)
        self._saved_trial_bracket = saved["trial_bracket"]
        compat.set_asha_num_stopped(self, saved["num_stopped"])
        self._written = self._state_text()

    def _read_state(self) -> dict:
        try:
            saved = json.loads(storage.read_text(self._state_path))
            problem = "" if STATE_KEYS <= set(saved) else f"keys {sorted(STATE_KEYS)} expected"
        except (ValueError, TypeError) as err:  # cut short, or JSON that is not an object
            problem = repr(err)
        if problem:
            raise ValueError(f"{self._state_path}: not an ASHA state file ({problem}); delete it to resume the sweep "
                             "without the rungs recorded before the interruption")
        return saved

    # --------------------------------------------------------------- Tune's hooks

    def on_trial_add(self, tune_controller, trial) -> None:
        if not self._state_loaded:
            self.load_state()
        super().on_trial_add(tune_controller, trial)
        saved_bracket = self._saved_trial_bracket.get(trial.trial_id)
        if saved_bracket is not None:  # a restored trial stays in the bracket it was compared in
            compat.asha_trial_brackets(self)[trial.trial_id] = compat.asha_brackets(self)[saved_bracket]

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        action = super().on_trial_result(tune_controller, trial, result)
        self.save_state()
        return action

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        super().on_trial_complete(tune_controller, trial, result)
        self.save_state()

    def on_trial_remove(self, tune_controller, trial) -> None:
        super().on_trial_remove(tune_controller, trial)
        self.save_state()
