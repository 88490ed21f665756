"""How the bundled demo model (`-m demo`) is made: scenes, training, evaluation."""
