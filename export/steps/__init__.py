"""The Triton Python-backend step sources the export copies into each model of a repository."""
