"""The data build (`subjectforge data build/refresh/verify`): photos in a source folder to a
versioned Parquet dataset of composites.

sources (scan, hash, subjects.csv) -> plan (the stage chain, declared once, as a Ray Data plan)
-> build (what to process, carry-forward, ledger, manifest) -> versions (folders, `latest`,
atomic publish), with verify (checksums of a published version), backgrounds and report (the
summary and the contact sheet).
"""
