"""Live models: tools that run the model again, with something changed.

Observational tools read what a harvest stored. Interventions must run the model:
patch an activation, add noise to the subject, ablate a head, skip a block. This
package holds what they share:

- ``holder.py``: ``ModelHolder``, a model (or one pipeline stage of it) loaded once on
  the device Ray assigned, with its thread count and lock. The harvest actor and the
  live actors both hold one.
- ``stage_worker.py``: ``StageWorker``, one stage that runs forwards with interventions
  and, for gradients, the backward through its blocks.
- ``model.py``: ``LiveModel``, what a tool sees: the chain of stage workers as one
  model (one worker for a whole replica), local or in Ray actors.
- ``prompts.py``: the prompt datasets live tools read, and their tokenization.
- ``runner.py``: the ``live`` tool scope: a prompt dataset fanned out over a pool of
  actors holding the model, results written to the store like any tool's.

Interventions are hook functions applied for one forward and removed: weights are
never changed (``weights_digest`` checks that in tests).
"""
