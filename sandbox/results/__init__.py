"""Run folders, manifests, tidy tables and atomic writes (the output contract).

Every command writes into one run folder: ``manifest.json`` (command line, resolved config,
package versions, git revision, seeds, start/end times), tidy CSV tables and figures. Every file is
written atomically: to a temporary file in the same folder, flushed, fsynced, then renamed over the
target, so a killed process leaves either the old file or the new one, never half of one. Files get
the permissions of the user's umask (like any ``open``), not the private 0600 of a temporary file.

One run folder holds one run at a time: `claim_run_dir` takes an exclusive ``flock`` on
``DIR/.sandbox.lock`` for the run's duration (the kernel drops it when the process dies, so a kill
never leaves a stale lock), and refuses, as a one-line `BadInput` naming ``--out``, a folder that
another live process holds, a folder of another command, a regular file, an unwritable path, or a
folder whose ``manifest.json`` is damaged.

One run folder holds one configuration: `open_run_dir` (what every command that writes a run
folder calls before it computes anything) compares the command's resolved config with the one the
folder's manifest records and refuses a different one with one line naming ``--out``, the folder
and the first differing field; the same config resumes. ``--overwrite`` replaces the folder whole
(only a run folder of this tool; recorded in the new manifest as ``overwritten``).

The package holds one concern per module: `sandbox.results.atomic` (atomic writes, guarded reads),
`jsonable` (the JSON form and its hash), `folders` (claims, one configuration per folder,
``--overwrite``, default folders) and `manifest` (`RunDir`). Every name is re-exported here, so
``from sandbox.results import ...`` is the import path to use; a test that replaces a function
patches it in the module that holds it.
"""

from __future__ import annotations

from sandbox.results.atomic import (FILE_MODE, _umask, atomic_open, atomic_save_torch, atomic_write_bytes,
                                    atomic_write_csv, atomic_write_json, atomic_write_text, damaged, load_torch,
                                    read_csv, read_json, save_figure)
from sandbox.results.folders import (COMMANDS, LOCK_NAME, RESUME_FIELDS, FolderBusy, _ABSENT, _HELD, _OVERWRITTEN,
                                     _check_owner, _defaults_of, _grows, _show, check_config, check_folder,
                                     claim_run_dir, config_difference, default_out, fcntl, flatten, is_run_folder,
                                     now_iso, open_run_dir, read_manifest_file, release_run_dir, replace_run_dir,
                                     replaced_note)
from sandbox.results.jsonable import config_hash, to_jsonable
from sandbox.results.manifest import PACKAGES, RunDir, git_revision, package_versions

__all__ = ["COMMANDS", "FILE_MODE", "LOCK_NAME", "PACKAGES", "RESUME_FIELDS", "FolderBusy", "RunDir", "_ABSENT",
           "_HELD", "_OVERWRITTEN", "_check_owner", "_defaults_of", "_grows", "_show", "_umask", "atomic_open",
           "atomic_save_torch", "atomic_write_bytes", "atomic_write_csv", "atomic_write_json", "atomic_write_text",
           "check_config", "check_folder", "claim_run_dir", "config_difference", "config_hash", "damaged",
           "default_out", "fcntl", "flatten", "git_revision", "is_run_folder", "load_torch", "now_iso",
           "open_run_dir", "package_versions", "read_csv", "read_json", "read_manifest_file", "release_run_dir",
           "replace_run_dir", "replaced_note", "save_figure", "to_jsonable"]
