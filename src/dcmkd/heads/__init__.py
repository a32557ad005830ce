"""Auxiliary classifiers built by the DCM rule from a backbone's own blocks, and multi-exit nets."""
from dcmkd.heads.builder import (AUX_KINDS, APFCHead, AuxiliaryClassifier, MultiExitNetwork,
                                 available_classifiers, build_branch, build_multi_exit,
                                 parse_classifiers)
from dcmkd.heads.tables import (AUX_TABLES, CLASSIFIER_NAMES, DEFAULT_CLASSIFIERS, BranchSpec,
                                branch_table, derived_branches)
from dcmkd.heads.wrap import WrappedNetwork, wrap_model, zoo_block_factory

__all__ = ["AUX_KINDS", "APFCHead", "AuxiliaryClassifier", "MultiExitNetwork",
           "available_classifiers", "build_branch", "build_multi_exit", "parse_classifiers",
           "AUX_TABLES", "CLASSIFIER_NAMES", "DEFAULT_CLASSIFIERS", "BranchSpec", "branch_table",
           "derived_branches", "WrappedNetwork", "wrap_model", "zoo_block_factory"]
