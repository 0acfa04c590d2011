"""DINO's Hungarian matcher and set criterion."""

from dinodet.loss.criterion import SetCriterion, build_criterion
from dinodet.loss.matcher import HungarianMatcher

__all__ = ["HungarianMatcher", "SetCriterion", "build_criterion"]
