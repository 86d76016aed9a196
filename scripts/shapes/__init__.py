"""The `shapes` preset's groundwork (issue 17): a synthetic captioned dataset, an OpenCV checker, a trainer.

``dataset`` draws the images on the fly (never stored), ``checker`` judges an image against its prompt's
attributes with OpenCV only, ``train`` trains the SD 1.x architecture shrunk like ``tiny`` on them.
See README.md beside this file.
"""
