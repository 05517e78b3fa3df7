"""Studies: the pipelines that run a whole analysis and write a folder of tables and figures."""
