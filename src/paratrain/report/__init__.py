"""Measurements drawn as pictures: pipeline timelines (Gantt charts) and bubbles."""
