"""Files that must survive kills: the one atomic writer and safe checkpoint reading."""
