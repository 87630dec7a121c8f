"""The window's views: the video with its annotations, the plots, the message bars."""
