"""Datasets: the embedded KanjiVG default and users' ImageFolder trees."""
