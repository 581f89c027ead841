"""The stages of a reconcile pass: each reads a snapshot, decides in pure code, writes.

Where it sits: between ``reconciling`` (which composes one pass of them and
the converge loop) and the modules they use: ``planning`` and ``outcomes``
decide, the ledger, the API client and the output folder are read and
written. The stages share only what :mod:`reconciler.stages.shared` holds
(the injected context, the pause on submissions, the pass's result and
scope); none imports another.

- ``scanning``: spec files → recorded specs → desired state;
- ``submitting``: the plan for this pass → batches → the ledger (budget,
  balance, API health and the pauses);
- ``tracking``: polls of batches, tasks and orphans → outcomes → the ledger;
- ``downloading``: finished clips (and covers) into the audio cache;
- ``materialising``: the output files, playlists and the prune.
"""
