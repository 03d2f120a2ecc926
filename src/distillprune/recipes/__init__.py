"""The runners: one module per recipe YAML in ``recipes/``, with the same name, each entry named ``run``;
``common`` holds the skeleton they share. Runners import the libraries; no library imports a runner."""
