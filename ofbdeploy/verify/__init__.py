"""Checks that a materialised model computes what the masked model computed (``ofbdeploy selfcheck``), and the
census of which timm models each family prunes."""
