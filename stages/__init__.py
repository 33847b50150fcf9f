"""Pipeline stages: plain functions that take typed configs and paths and write files.

Each module is one stage (or the model surgery the stages share); none of them imports
Prefect, so every stage can be called and tested on its own.
"""
