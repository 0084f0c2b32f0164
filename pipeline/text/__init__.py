"""Caption text: noun phrases (tagger), their CLIP token positions (alignment) and the nouns stage's rows."""
