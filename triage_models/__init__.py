"""Training code, data and trained artefacts of the triage classifier.

The runtime side (loading an artefact, embedding, scoring) lives in :mod:`pipeline.triage`, so workers never
import training dependencies' heavier paths; this package only produces what that module reads.
``python -m triage_models.train --out triage_models/artifacts/current`` re-creates the committed artefact.
"""
