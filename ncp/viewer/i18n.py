"""The viewer's words in the health professional's language (the launch token's ``locale``),
and coded values (modality, body part) from the project's terminology in its eight languages.

Labels exist in English, German and French; another language falls back to English for the
labels, while coded values still come in that language when the terminology has it.
"""

from __future__ import annotations

from collections.abc import Iterable

from ncp.fhir.terminology import Terminology, default_terminology

LANGUAGES = ("en", "de", "fr")
DCM = "http://dicom.nema.org/resources/ontology/DCM"
BODY_PART = "https://ncp.example/fhir/CodeSystem/dicom-body-part-examined"

_LABELS: dict[str, dict[str, str]] = {
    "en": {
        "title": "Image viewer",
        "studies": "Studies",
        "series": "Series",
        "images": "images",
        "frames": "frames",
        "image": "Im",
        "frame": "Fr",
        "window": "W",
        "level": "L",
        "zoom": "Zoom",
        "presets": "Window presets",
        "preset_default": "Image default",
        "preset_lung": "CT lung",
        "preset_mediastinum": "CT mediastinum",
        "preset_bone": "CT bone",
        "preset_brain": "CT brain",
        "preset_abdomen": "CT abdomen",
        "tool_window": "Window",
        "tool_pan": "Pan",
        "tool_zoom": "Zoom",
        "tool_scroll": "Scroll",
        "reset": "Reset",
        "cine": "Cine",
        "info": "Info",
        "help": "Help",
        "lossy": "LOSSY PREVIEW",
        "lossless": "LOSSLESS",
        "loading": "Loading…",
        "no_images": "This study has no images that can be shown.",
        "session_ends": "Session ends",
        "session_over": "The viewing session has ended. Open the images again from your portal.",
        "patient": "Patient",
        "born": "born",
        "sex": "Sex",
        "study": "Study",
        "accession": "Accession",
        "institution": "Institution",
        "instance_info": "Image information",
        "series_info": "Series information",
        "thickness": "Thickness",
        "location": "Location",
        "spacing": "Pixel spacing",
        "size": "Size",
        "syntax": "Transfer syntax",
        "photometric": "Photometric",
        "modality": "Modality",
        "body_part": "Body part",
        "description": "Description",
        "number": "Number",
        "date": "Date",
        "shortcuts": "Keyboard shortcuts",
        "key_scroll": "Previous / next image",
        "key_series": "Previous / next series",
        "key_first_last": "First / last image",
        "key_cine": "Play / stop cine",
        "key_presets": "Window presets",
        "key_default": "Image default window",
        "key_zoom": "Zoom in / out",
        "key_reset": "Reset view",
        "key_tools": "Tools: window, pan, zoom, scroll",
        "key_info": "Image information",
        "key_help": "This help",
        "close": "Close",
        "placeholder": "This image cannot be displayed",
        "refused_title": "The images cannot be opened",
        "refused_hint": "Ask for the images again in your portal; a viewer link works once "
        "and for one minute.",
        "error_code": "Reason",
    },
    "de": {
        "title": "Bildbetrachter",
        "studies": "Studien",
        "series": "Serien",
        "images": "Bilder",
        "frames": "Frames",
        "image": "Bild",
        "frame": "Fr",
        "window": "W",
        "level": "L",
        "zoom": "Zoom",
        "presets": "Fenstervorgaben",
        "preset_default": "Bildvorgabe",
        "preset_lung": "CT Lunge",
        "preset_mediastinum": "CT Mediastinum",
        "preset_bone": "CT Knochen",
        "preset_brain": "CT Gehirn",
        "preset_abdomen": "CT Abdomen",
        "tool_window": "Fenster",
        "tool_pan": "Verschieben",
        "tool_zoom": "Zoom",
        "tool_scroll": "Blättern",
        "reset": "Zurücksetzen",
        "cine": "Cine",
        "info": "Info",
        "help": "Hilfe",
        "lossy": "VERLUSTBEHAFTETE VORSCHAU",
        "lossless": "VERLUSTFREI",
        "loading": "Wird geladen…",
        "no_images": "Diese Studie enthält keine darstellbaren Bilder.",
        "session_ends": "Sitzung endet",
        "session_over": "Die Sitzung ist beendet. Öffnen Sie die Bilder erneut über Ihr Portal.",
        "patient": "Patient",
        "born": "geb.",
        "sex": "Geschlecht",
        "study": "Studie",
        "accession": "Auftragsnummer",
        "institution": "Einrichtung",
        "instance_info": "Bildinformationen",
        "series_info": "Serieninformationen",
        "thickness": "Schichtdicke",
        "location": "Position",
        "spacing": "Pixelabstand",
        "size": "Größe",
        "syntax": "Transfersyntax",
        "photometric": "Photometrie",
        "modality": "Modalität",
        "body_part": "Körperregion",
        "description": "Beschreibung",
        "number": "Nummer",
        "date": "Datum",
        "shortcuts": "Tastenkürzel",
        "key_scroll": "Vorheriges / nächstes Bild",
        "key_series": "Vorherige / nächste Serie",
        "key_first_last": "Erstes / letztes Bild",
        "key_cine": "Cine starten / anhalten",
        "key_presets": "Fenstervorgaben",
        "key_default": "Fenster des Bildes",
        "key_zoom": "Vergrößern / verkleinern",
        "key_reset": "Ansicht zurücksetzen",
        "key_tools": "Werkzeuge: Fenster, Verschieben, Zoom, Blättern",
        "key_info": "Bildinformationen",
        "key_help": "Diese Hilfe",
        "close": "Schließen",
        "placeholder": "Dieses Bild kann nicht angezeigt werden",
        "refused_title": "Die Bilder können nicht geöffnet werden",
        "refused_hint": "Fordern Sie die Bilder in Ihrem Portal erneut an; ein Betrachter-Link "
        "gilt einmal und eine Minute lang.",
        "error_code": "Grund",
    },
    "fr": {
        "title": "Visionneuse d'images",
        "studies": "Examens",
        "series": "Séries",
        "images": "images",
        "frames": "trames",
        "image": "Im",
        "frame": "Tr",
        "window": "L",
        "level": "C",
        "zoom": "Zoom",
        "presets": "Fenêtres prédéfinies",
        "preset_default": "Fenêtre de l'image",
        "preset_lung": "TDM poumon",
        "preset_mediastinum": "TDM médiastin",
        "preset_bone": "TDM os",
        "preset_brain": "TDM cerveau",
        "preset_abdomen": "TDM abdomen",
        "tool_window": "Fenêtrage",
        "tool_pan": "Déplacer",
        "tool_zoom": "Zoom",
        "tool_scroll": "Défiler",
        "reset": "Réinitialiser",
        "cine": "Ciné",
        "info": "Infos",
        "help": "Aide",
        "lossy": "APERÇU AVEC PERTE",
        "lossless": "SANS PERTE",
        "loading": "Chargement…",
        "no_images": "Cet examen ne contient aucune image affichable.",
        "session_ends": "Fin de session",
        "session_over": "La session est terminée. Rouvrez les images depuis votre portail.",
        "patient": "Patient",
        "born": "né(e) le",
        "sex": "Sexe",
        "study": "Examen",
        "accession": "N° d'examen",
        "institution": "Établissement",
        "instance_info": "Informations sur l'image",
        "series_info": "Informations sur la série",
        "thickness": "Épaisseur",
        "location": "Position",
        "spacing": "Espacement des pixels",
        "size": "Taille",
        "syntax": "Syntaxe de transfert",
        "photometric": "Photométrie",
        "modality": "Modalité",
        "body_part": "Région anatomique",
        "description": "Description",
        "number": "Numéro",
        "date": "Date",
        "shortcuts": "Raccourcis clavier",
        "key_scroll": "Image précédente / suivante",
        "key_series": "Série précédente / suivante",
        "key_first_last": "Première / dernière image",
        "key_cine": "Lancer / arrêter le ciné",
        "key_presets": "Fenêtres prédéfinies",
        "key_default": "Fenêtre de l'image",
        "key_zoom": "Agrandir / réduire",
        "key_reset": "Réinitialiser la vue",
        "key_tools": "Outils : fenêtrage, déplacer, zoom, défiler",
        "key_info": "Informations sur l'image",
        "key_help": "Cette aide",
        "close": "Fermer",
        "placeholder": "Cette image ne peut pas être affichée",
        "refused_title": "Les images ne peuvent pas être ouvertes",
        "refused_hint": "Demandez à nouveau les images dans votre portail ; un lien de "
        "visualisation ne sert qu'une fois, pendant une minute.",
        "error_code": "Motif",
    },
}

PRESETS = (
    ("preset_lung", -600.0, 1500.0),
    ("preset_mediastinum", 50.0, 350.0),
    ("preset_bone", 400.0, 1800.0),
    ("preset_brain", 40.0, 80.0),
    ("preset_abdomen", 50.0, 400.0),
)
"""CT window presets (level, width in HU), in the order of the keys 1 to 5."""


def language_of(locale: str | None) -> str:
    """The labels' language for a BCP 47 tag: its primary subtag when held, else English."""
    primary = (locale or "").strip().replace("_", "-").split("-", 1)[0].lower()
    return primary if primary in _LABELS else "en"


def labels(locale: str | None) -> dict[str, str]:
    return dict(_LABELS[language_of(locale)])


def from_accept_language(header: str | None) -> str:
    """The best held language from an Accept-Language header (for pages shown before anyone is
    known, such as a refused launch)."""
    ranked: list[tuple[float, int, str]] = []
    for order, item in enumerate((header or "").split(",")):
        tag, _, params = item.strip().partition(";")
        q = 1.0
        if params.strip().startswith("q="):
            try:
                q = float(params.strip()[2:])
            except ValueError:
                q = 0.0
        language = tag.strip().split("-", 1)[0].lower()
        if language in _LABELS and q > 0:
            ranked.append((-q, order, language))
    return min(ranked)[2] if ranked else "en"


def coded_displays(
    locale: str | None, modalities: Iterable[str], body_parts: Iterable[str]
) -> dict[str, dict[str, str]]:
    """Displays of DICOM modality codes and Body Part Examined terms in the HP's language
    (``locale`` as given: a terminology language beyond the labels' three is used too)."""
    terms: Terminology = default_terminology()  # read once, cached by the module
    language = (locale or "en").strip() or "en"
    out: dict[str, dict[str, str]] = {"modality": {}, "bodyPart": {}}
    for code in sorted(set(modalities)):
        shown = terms.display(DCM, code, language)
        if shown:
            out["modality"][code] = shown
    for code in sorted(set(body_parts)):
        shown = terms.display(BODY_PART, code, language)
        if shown:
            out["bodyPart"][code] = shown
    return out
