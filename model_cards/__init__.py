"""Model card templates for posthoc artifacts (rendered by :mod:`posthoc.card`)."""
